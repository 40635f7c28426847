"""Run the GPU validation matrix with ftl's own trainer and record each measurement beside ftl's estimate.

`scripts/gpu-validate` runs this; it is the one command for a GPU machine that may reach no package registry
(docs/validation/README.md):

    scripts/gpu-validate --out "$OUT"                 # install .gpu-kit offline, then bench/gpu_matrix.yaml
    scripts/gpu-validate --rehearse                   # the same code path on the CPU, tiny model, a few steps
    scripts/gpu-validate --only llama-3.2-1b-lora --out DIR
    scripts/gpu-validate --recipe R.yaml --set k=v --name N --out DIR   # one ad-hoc entry

Why it is built this way:
- GPU time is short and may be cut off: entries run most valuable first, each record is appended to one JSONL file
  and fsynced as soon as it exists, the budget (`--budget-s`, from the start of the command) skips entries it
  cannot hold and stops a running one at a step boundary, so a cut-off run still returns what it measured.
- The numbers must describe what ftl really does: each train entry goes through `launch.prepare_launch` ->
  `write_run` -> `train.run.setup` -> the task's Trainer, in this one process (no process start per entry).
  Only the weights are prepared here: a folder with the catalog config and random bf16 weights is written once per
  model (the trainer's own random init writes fp32 weights into every run directory: 32 GB per 8B entry).
- A recipe key that ftl rejects (e.g. a newer `train.precision` value) makes a `skipped` record with ftl's error
  text; a missing package too; an OOM or a crash makes a `failed` record; the next entry runs all the same.
- `--rehearse` runs on the CPU (CUDA hidden), with the shipped tiny Llama, in a temporary folder, and measures the
  peak of live tensor bytes (tests/live_bytes.py) as the CPU stand-in for torch.cuda.max_memory_allocated.

Record (one JSON object per line; the first line is the environment): `record: entry`, `name`, `status` (ok, cut,
skipped, failed), `reason`, `recipe`, `sets` (what `ftl estimate` is given, less the cluster keys that
tests/test_validation.py adds from `gpu`), `runtime_sets` (the model folder and data swapped in for the run), `gpu`,
`device`, `measured` (max_memory_allocated, max_memory_reserved, nvidia_smi_peak_mib, step_time_s_median,
tokens_per_s, mfu, ...), `estimate` (the whole `ftl estimate --json` object), `versions`, `date`.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import importlib.metadata as md
import json
import os
import platform
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
MATRIX = ROOT / "bench" / "gpu_matrix.yaml"
KIT = ROOT / ".gpu-kit"
TINY = ROOT / "recipes" / "assets" / "tiny-llama"  # its tokenizer serves every model (only token ids matter)
SCHEMA = 1
PACKAGES = ("torch", "triton", "transformers", "accelerate", "peft", "trl", "datasets", "bitsandbytes", "deepspeed",
            "liger-kernel", "pydantic", "pydantic-core", "typer", "tokenizers", "safetensors", "huggingface-hub",
            "numpy", "ftl")
CLUSTER_KEYS = ("cluster.gpu", "cluster.gpus_per_node", "cluster.nodes")


# ---------------------------------------------------------------------------------------------
# The matrix


@dataclass
class Entry:
    name: str
    recipe: str
    sets: list[str]
    kind: str = "train"
    needs: list[str] = field(default_factory=list)
    expect_s: float = 60.0


@dataclass
class Matrix:
    common: list[str]
    rehearse: list[str]
    launch_rehearse: list[str]
    entries: list[Entry]


def load_matrix(path: Path = MATRIX) -> Matrix:
    import yaml

    raw = yaml.safe_load(path.read_text())
    entries = [Entry(name=e["name"], recipe=e["recipe"], sets=list(e.get("sets") or []), kind=e.get("kind", "train"),
                     needs=list(e.get("needs") or []), expect_s=float(e.get("expect_s", 60))) for e in raw["entries"]]
    return Matrix(list(raw.get("common") or []), list(raw.get("rehearse") or []), list(raw.get("launch_rehearse") or []),
                  entries)


def entry_sets(m: Matrix, e: Entry, rehearse: bool) -> list[str]:
    """The sets a record keeps: common (train entries) + the entry's + the rehearsal's (later sets win)."""
    if e.kind == "launch":
        return e.sets + (m.launch_rehearse if rehearse else [])
    return m.common + e.sets + (m.rehearse if rehearse else [])


def cluster_sets(gpu: str | None) -> list[str]:
    """One device of the GPU this ran on (none: the CPU), as tests/test_validation.py re-estimates it."""
    return [f"cluster.gpu={gpu}" if gpu else "cluster.gpu=null", "cluster.gpus_per_node=1", "cluster.nodes=1"]


# ---------------------------------------------------------------------------------------------
# Records: one JSONL file, each line on disk before the next entry starts


class RecordFile:
    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)

    def append(self, rec: dict[str, Any]) -> None:
        new = not self.path.exists()
        with open(self.path, "a") as f:
            f.write(json.dumps(rec, default=str) + "\n")
            f.flush()
            os.fsync(f.fileno())
        if new:  # the directory entry too, so a cut-off machine still has the file
            fd = os.open(self.path.parent, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def read_records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ---------------------------------------------------------------------------------------------
# The machine: versions, GPU, the offline install


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out


def check_versions() -> list[str]:
    """What ftl's requirements (pyproject.toml) find missing or too old here, one line each ([]: all met)."""
    import tomllib

    from packaging.requirements import Requirement

    wanted = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"] + ["liger-kernel"]
    found = []
    for line in wanted:
        req = Requirement(line)
        try:
            have = md.version(req.name)
        except md.PackageNotFoundError:
            found.append(f"{req.name}: not installed (ftl needs {req})")
            continue
        if not req.specifier.contains(have, prereleases=True):
            found.append(f"{req.name} {have}: ftl needs {req}")
    return found


def nvidia_smi(query: str) -> list[str]:
    """One nvidia-smi --query-gpu line per GPU ([] without nvidia-smi)."""
    if not shutil.which("nvidia-smi"):
        return []
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in out.splitlines() if line.strip()]


def pip(*args: str, env: dict[str, str] | None = None, timeout: float = 300) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "pip", "--disable-pip-version-check", "install", "--no-index", "--find-links", str(KIT),
           *args]
    t = time.monotonic()
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})})
        rc, tail = res.returncode, (res.stdout + res.stderr)[-3000:]
    except subprocess.TimeoutExpired:
        rc, tail = 124, f"timed out after {timeout:.0f} s"
    importlib.invalidate_caches()  # this process imports what was just installed (its path finders cached the folders)
    print(f"gpu-validate: pip install {' '.join(args)}: {'ok' if rc == 0 else f'FAILED (rc {rc})'}", flush=True)
    if rc:
        print(tail, flush=True)
    return {"args": list(args), "rc": rc, "s": round(time.monotonic() - t, 1), "tail": tail if rc else ""}


def kit_manifest() -> dict[str, Any] | None:
    p = KIT / "manifest.json"
    return json.loads(p.read_text()) if p.is_file() else None


def install_kit() -> list[dict[str, Any]]:
    """Install what .gpu-kit holds (scripts/gpu-kit wrote manifest.json), offline; DeepSpeed waits for its entry."""
    man = kit_manifest()
    if man is None:
        print(f"gpu-validate: no {KIT}/manifest.json: nothing installed (build it with scripts/gpu-kit)", flush=True)
        return [{"args": [], "rc": None, "tail": "no kit"}]
    steps = []
    if man.get("build_tools"):
        steps.append(pip(*man["build_tools"]))
    if man.get("install"):
        steps.append(pip(*man["install"]))
        if steps[-1]["rc"]:  # one unmet requirement fails the whole command: install what can be, one by one
            steps += [pip(req) for req in man["install"]]
    if man.get("ftl_wheel"):
        steps.append(pip("--no-deps", "--force-reinstall", str(KIT / man["ftl_wheel"])))
    return steps


def install_deepspeed() -> dict[str, Any] | None:
    """DeepSpeed's sdist, built here without network (no build isolation) and with no op compiled (JIT later)."""
    man = kit_manifest() or {}
    req = man.get("deepspeed")
    if not req:
        return None
    return pip("--no-build-isolation", req, env={"DS_BUILD_OPS": "0"}, timeout=400)


def importable(module: str) -> str | None:
    """None when `module` imports, else why not (one line)."""
    try:
        importlib.import_module(module)
        return None
    except Exception as e:  # noqa: BLE001 - ImportError, or a package that breaks at import
        return f"{module} does not import: {type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"


# ---------------------------------------------------------------------------------------------
# What the runs train on: model folders with weights, long SFT examples


def model_folder(ref: str, work: Path, device: str) -> Path:
    """A folder with the model's config (catalog or local), the tiny tokenizer and seeded random bf16 weights."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from launcher.spec.catalog import resolve_model

    spec = resolve_model(ref)
    folder = work / "models" / Path(spec.name).name
    if (folder / "config.json").is_file() and any(folder.glob("*.safetensors")):
        return folder
    t = time.monotonic()
    cfg_dict = {k: v for k, v in spec.config.items() if k not in ("architectures", "torch_dtype", "dtype")}
    cfg = AutoConfig.for_model(cfg_dict.pop("model_type"), **cfg_dict)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    del model
    tok_src = Path(spec.path) if spec.path and (Path(spec.path) / "tokenizer.json").is_file() else TINY
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tok_src / f, tmp / f)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    _free_memory()
    print(f"gpu-validate: {spec.name}: random bf16 weights in {folder} ({time.monotonic() - t:.1f} s)", flush=True)
    return folder


def sft_data(work: Path, examples: int, seq_len: int) -> Path:
    """Alpaca-style examples whose output alone is longer than seq_len tokens: every sequence is cut to full length."""
    path = work / "data" / f"long-{examples}x{seq_len}.jsonl"
    if path.is_file():
        return path
    words = sorted(set((ROOT / "recipes" / "data" / "corpus.txt").read_text().split()))
    rng = random.Random(0)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for _ in range(examples):
            text = " ".join(rng.choice(words) for _ in range(2 * seq_len))  # >= 1 token a word
            f.write(json.dumps({"instruction": "Continue the text.", "input": "", "output": text}) + "\n")
    return path


# ---------------------------------------------------------------------------------------------
# Measuring


def _free_memory() -> None:
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
    except Exception:  # noqa: BLE001 - a broken CUDA context shows in the next entry's record
        pass


class SmiPeak:
    """The most memory nvidia-smi reports in use on GPU 0 while the block runs (polled every 100 ms)."""

    def __init__(self) -> None:
        self.peak_mib: int | None = None
        self.baseline_mib: int | None = None
        self._proc: subprocess.Popen | None = None
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "SmiPeak":
        lines = nvidia_smi("memory.used")
        if not lines:
            return self
        self.baseline_mib = self.peak_mib = int(float(lines[0]))
        self._proc = subprocess.Popen(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits",
                                       "-i", "0", "-lms", "100"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                      text=True)
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()
        return self

    def _read(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        for line in self._proc.stdout:
            with contextlib.suppress(ValueError):
                self.peak_mib = max(self.peak_mib or 0, int(float(line.strip())))

    def __exit__(self, *exc: Any) -> None:
        if self._proc is not None:
            self._proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(timeout=5)
            if self._proc.poll() is None:
                self._proc.kill()
        if self._thread is not None:
            self._thread.join(timeout=5)


def make_step_timer(deadline: float, cuda: bool):
    """A TrainerCallback: wall time between optimizer steps (synchronized), and a stop at the deadline."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.ends: list[float] = []
            self.cut = False

        def _now(self) -> float:
            if cuda:
                import torch

                torch.cuda.synchronize()
            return time.perf_counter()

        def on_train_begin(self, args, state, control, **kw):
            self.ends = [self._now()]

        def on_step_end(self, args, state, control, **kw):
            self.ends.append(self._now())
            if time.monotonic() > deadline and state.global_step < state.max_steps:
                self.cut = True
                control.should_training_stop = True
            return control

        def step_times(self) -> list[float]:
            return [b - a for a, b in zip(self.ends, self.ends[1:])]

    return StepTimer()


class TokenCounter:
    """Tokens the model is fed (a forward pre-hook): what tokens/s divides, and the sequence length it really saw."""

    def __init__(self, model) -> None:
        self.tokens = 0
        self.max_len = 0
        self.calls = 0
        self._h = model.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, mod, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is not None and hasattr(ids, "shape") and len(ids.shape) == 2:
            self.tokens += int(ids.numel())
            self.max_len = max(self.max_len, int(ids.shape[1]))
            self.calls += 1

    def remove(self) -> None:
        self._h.remove()


@contextlib.contextmanager
def saved_environ() -> Iterator[None]:
    """setup_distributed sets RANK, MASTER_PORT, ACCELERATE_USE_DEEPSPEED... for a one-process world: undo per entry."""
    before = dict(os.environ)
    try:
        yield
    finally:
        for k in set(os.environ) - set(before):
            del os.environ[k]
        os.environ.update(before)


def _reset_accelerate() -> None:
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


def _short(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).strip()[:1500]}"


@dataclass
class Context:
    rehearse: bool
    device: str  # cuda | cpu
    gpu: str | None  # torch.cuda.get_device_name(0)
    work: Path
    deadline: float
    versions: dict[str, str | None]
    matrix: Matrix

    def remaining(self) -> float:
        return self.deadline - time.monotonic()


def estimate_json(recipe_path: str, sets: list[str], gpu: str | None) -> dict[str, Any]:
    """What `ftl estimate RECIPE --set ... --json` prints (the same function, in-process)."""
    from launcher.estimate.search import estimate
    from launcher.spec.recipe import load_recipe

    return estimate(load_recipe(ROOT / recipe_path, sets=sets + cluster_sets(gpu))).to_json()


def base_record(ctx: Context, e: Entry, sets: list[str]) -> dict[str, Any]:
    return {"record": "entry", "schema": SCHEMA, "name": e.name, "kind": e.kind, "status": None, "reason": None,
            "recipe": e.recipe, "sets": sets, "runtime_sets": [], "device": ctx.device, "gpu": ctx.gpu,
            "rehearsal": ctx.rehearse, "measured": None, "estimate": None, "versions": versions(),
            "date": time.strftime("%Y-%m-%d"), "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def train_entry(ctx: Context, e: Entry, rec: dict[str, Any]) -> None:
    """One entry through ftl's own launch and trainer code, in this process; fills rec."""
    from launcher.core.errors import FtlError
    from launcher.launch import prepare_launch, render_files, write_run
    from launcher.spec.recipe import load_recipe
    from launcher.train.run import read_run_dir, setup

    sets, est = rec["sets"], rec["estimate"]
    probe = load_recipe(ROOT / e.recipe, sets=sets + cluster_sets(ctx.gpu))
    runtime = [f"model={model_folder(probe.model, ctx.work, ctx.device)}",
               f"data.path={sft_data(ctx.work, probe.data.num_examples or 16, probe.data.max_seq_len)}",
               "data.format=jsonl"]
    rec["runtime_sets"] = runtime
    recipe = load_recipe(ROOT / e.recipe, sets=sets + runtime + cluster_sets(ctx.gpu))
    p = prepare_launch(recipe, force=True, root=ctx.work / "runs", gpu_count=1 if ctx.device == "cuda" else 0)
    run = write_run(render_files(p))
    r, plan = read_run_dir(run.dir)

    import torch
    from transformers.trainer_utils import SaveStrategy

    cuda = ctx.device == "cuda"
    sess = trainer = counter = lb = None
    smi = SmiPeak()
    timer = make_step_timer(ctx.deadline, cuda)
    t0 = time.monotonic()
    try:
        with saved_environ():
            _reset_accelerate()
            sess = setup(r, plan, run.dir)
            trainer = sess.trainer
            trainer.remove_callback(sess.stopper)  # it saves a checkpoint at the end (48 GB for 8B full)
            trainer.args.save_strategy = SaveStrategy.NO
            trainer.add_callback(timer)
            counter = TokenCounter(trainer.model)
            setup_s = time.monotonic() - t0
            _free_memory()
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            else:
                lb = live_bytes_mode(trainer.model)
            with smi, (lb if lb is not None else contextlib.nullcontext()):
                trainer.train()
            if cuda:
                torch.cuda.synchronize()
            steps = timer.step_times()
            warm = steps[3:] or steps[1:] or steps
            median = statistics.median(warm) if warm else None
            tokens_per_step = counter.tokens / max(1, len(steps)) if steps else None
            losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
            rec["measured"] = {
                # the CUDA allocator's figures; the CPU has none (its live tensor bytes are a different thing)
                "max_memory_allocated": torch.cuda.max_memory_allocated() if cuda else None,
                "max_memory_reserved": torch.cuda.max_memory_reserved() if cuda else None,
                "cpu_live_bytes_peak": None if cuda else lb.peak,
                "memory_source": "torch.cuda" if cuda else "live tensor bytes on the CPU (tests/live_bytes.py LiveBytes)",
                "nvidia_smi_peak_mib": smi.peak_mib,
                "nvidia_smi_baseline_mib": smi.baseline_mib,
                "steps": len(steps),
                "step_times_s": [round(s, 4) for s in steps],
                "step_time_s_median": median,
                "tokens_per_step": tokens_per_step,
                "tokens_per_s": tokens_per_step / median if median and tokens_per_step else None,
                "seq_len_seen": counter.max_len,
                "mfu": measured_mfu(est, median),
                "mfu_assumed": est["assumptions"].get("mfu"),
                "first_loss": losses[0] if losses else None,
                "last_loss": losses[-1] if losses else None,
                "setup_s": round(setup_s, 1),
                "shards": _json_or_none(run.dir / "shards" / "rank-0.json"),
            }
            rec.update(status="cut" if timer.cut else "ok",
                       reason=f"budget: stopped after {len(steps)} steps" if timer.cut else None)
    except torch.OutOfMemoryError as err:
        rec.update(status="failed", reason=f"out of memory: {_short(err)}")
        if cuda:
            rec["measured"] = {"max_memory_allocated": torch.cuda.max_memory_allocated(),
                               "max_memory_reserved": torch.cuda.max_memory_reserved(),
                               "memory_source": "torch.cuda (at the OOM)", "nvidia_smi_peak_mib": smi.peak_mib}
    except FtlError as err:
        rec.update(status="skipped", reason=f"ftl refuses: {err}")
    finally:
        if counter is not None:
            counter.remove()
        del sess, trainer, counter, lb
        _free_memory()


def live_bytes_mode(model):
    """The CPU stand-in for the CUDA allocator's peak: every live tensor storage, counted once."""
    sys.path.insert(0, str(ROOT / "tests"))
    from live_bytes import LiveBytes

    lb = LiveBytes(breakdown=False)
    lb.track_module(model)
    return lb


def measured_mfu(est: dict[str, Any], step_s: float | None) -> float | None:
    """ftl's FLOPs per step over the measured step time and the GPU's peak (the one the estimate divides by)."""
    mfu, t_est, flops = est["assumptions"].get("mfu"), est.get("step_time_s"), est.get("flops_per_step")
    if not (mfu and t_est and flops and step_s):
        return None
    return mfu * t_est / step_s  # step_time_s = flops / (peak * mfu) on one GPU, so peak = flops / (t_est * mfu)


def _json_or_none(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def launch_entry(ctx: Context, e: Entry, rec: dict[str, Any]) -> None:
    """`ftl launch RECIPE --set ...` end to end in a child process: the CLI, the local backend, the trainer."""
    sets = rec["sets"] + (cluster_sets(ctx.gpu)[:1] if ctx.gpu else [])
    runs = ctx.work / "launch-runs"
    env = {**os.environ, "FTL_RUNS_DIR": str(runs), "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "launcher.cli", "launch", e.recipe, *(a for s in sets for a in ("--set", s)), "--json"]
    timeout = max(10.0, ctx.remaining())
    t = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)  # the launcher stops its trainer on SIGTERM ...
        try:
            out, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # ... else the group it leads goes
            out, err = proc.communicate()
        rec.update(status="cut", reason=f"budget: ftl launch stopped after {timeout:.0f} s")
    wall = time.monotonic() - t
    result = next((_json_or_none(p) for p in sorted(runs.glob("*/result.json"))), None) or {}
    rec["measured"] = {
        "runs_dir": str(runs),
        "max_memory_allocated": result.get("peak_memory_bytes"),
        "max_memory_reserved": result.get("peak_reserved_bytes"),
        "wall_s": round(wall, 1),
        "exit_code": proc.returncode,
        "global_step": result.get("global_step"),
        "first_loss": result.get("first_loss"),
        "final_loss": result.get("final_loss"),
        "train_runtime_s": result.get("train_runtime_s"),
        "result_status": result.get("status"),
        "device": result.get("device"),
    }
    if rec["status"] is None:
        ok = proc.returncode == 0 and result.get("status") == "completed"
        rec.update(status="ok" if ok else "failed",
                   reason=None if ok else f"ftl launch exited {proc.returncode}: {(err or out)[-1500:]}")


def run_entry(ctx: Context, e: Entry, records: RecordFile) -> dict[str, Any]:
    """One record, written before returning, whatever happened."""
    from launcher.core.errors import FtlError

    rec = base_record(ctx, e, entry_sets(ctx.matrix, e, ctx.rehearse))
    t = time.monotonic()
    expect = 0.0 if ctx.rehearse else e.expect_s
    try:
        if ctx.remaining() <= 0 or ctx.remaining() < expect:
            rec.update(status="skipped", reason=f"budget: {max(0.0, ctx.remaining()):.0f} s left, the entry expects {expect:.0f} s")
        elif (why := _estimate_or_reason(ctx, e, rec, FtlError)) is not None:
            rec.update(status="skipped", reason=why)
        else:
            if "deepspeed" in e.needs and not ctx.rehearse and importable("deepspeed"):
                rec["install"] = install_deepspeed()
                rec["versions"] = versions()
            missing = [why for m in e.needs if (why := importable(m))]
            if missing:
                rec.update(status="skipped", reason="; ".join(missing))
            else:
                (launch_entry if e.kind == "launch" else train_entry)(ctx, e, rec)
    except Exception as err:  # noqa: BLE001 - record it and go on with the next entry
        rec.update(status="failed", reason=_short(err), traceback=traceback.format_exc()[-4000:])
    _free_memory()  # after the except block: its traceback no longer holds the entry's tensors
    rec["wall_s"] = round(time.monotonic() - t, 1)
    records.append(rec)
    print(f"gpu-validate: {e.name}: {rec['status']}" + (f" ({rec['reason'][:300]})" if rec["reason"] else "")
          + _summary(rec) + f" [{rec['wall_s']} s]", flush=True)
    return rec


def _estimate_or_reason(ctx: Context, e: Entry, rec: dict[str, Any], FtlError: type) -> str | None:
    """`ftl estimate` of the entry into rec; a recipe this ftl rejects (an unknown key or value) is the reason."""
    try:
        rec["estimate"] = estimate_json(e.recipe, rec["sets"], ctx.gpu)
        return None
    except FtlError as err:
        return f"ftl rejects the recipe: {err}"


def _summary(rec: dict[str, Any]) -> str:
    m, est = rec.get("measured") or {}, (rec.get("estimate") or {}).get("per_device") or {}
    out = []
    peak = m.get("max_memory_allocated") or m.get("cpu_live_bytes_peak")
    if peak:
        what = "peak allocated" if m.get("max_memory_allocated") else "CPU live-bytes peak"
        out.append(f"{what} {peak / 1024**3:.2f} GiB")
        if est.get("peak_allocated_bytes"):
            out.append(f"{peak / est['peak_allocated_bytes']:.2f}x the estimate")
    if m.get("step_time_s_median"):
        out.append(f"step {m['step_time_s_median']:.3f} s")
    if m.get("mfu"):
        out.append(f"MFU {m['mfu']:.2f}")
    return "; " + ", ".join(out) if out else ""


# ---------------------------------------------------------------------------------------------


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="scripts/gpu-validate", description=__doc__.splitlines()[0])
    ap.add_argument("--rehearse", action="store_true", help="the CPU, the tiny model, a few steps, a temporary folder")
    ap.add_argument("--out", type=Path, default=None, help="folder for the JSONL file (default: docs/validation on a "
                    "GPU, a new temporary folder with --rehearse)")
    ap.add_argument("--only", nargs="+", default=None, metavar="NAME", help="run these entries only (matrix order)")
    ap.add_argument("--budget-s", type=float, default=480.0, help="seconds for the whole command, install included")
    ap.add_argument("--no-install", action="store_true", help="use what is installed (skip the .gpu-kit install)")
    ap.add_argument("--matrix", type=Path, default=MATRIX)
    ap.add_argument("--work", type=Path, default=None, help="scratch folder (model weights, runs; default: temporary)")
    ap.add_argument("--recipe", default=None, help="an ad-hoc entry instead of the matrix: this recipe ...")
    ap.add_argument("--set", dest="sets", action="append", default=[], help="... with these overrides ...")
    ap.add_argument("--name", default=None, help="... under this name")
    ap.add_argument("--list", action="store_true", help="print the matrix and exit")
    return ap.parse_args(argv)


def select(m: Matrix, args: argparse.Namespace) -> list[Entry]:
    if args.recipe:
        return [Entry(name=args.name or Path(args.recipe).stem, recipe=args.recipe, sets=args.sets)]
    if not args.only:
        return m.entries
    known = {e.name for e in m.entries}
    unknown = [n for n in args.only if n not in known]
    if unknown:
        raise SystemExit(f"gpu-validate: --only {' '.join(unknown)}: not in {args.matrix.name}; known: {', '.join(sorted(known))}")
    return [e for e in m.entries if e.name in args.only]


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    start = time.monotonic()
    matrix = load_matrix(args.matrix)
    entries = select(matrix, args)
    if args.list:
        for e in entries:
            print(f"{e.name:40s} {e.kind:6s} {e.expect_s:5.0f} s  {e.recipe} {' '.join(entry_sets(matrix, e, False))}")
        return 0
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if args.rehearse:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # the CPU, even on a GPU machine
        os.environ["FTL_NO_GPU_DETECT"] = "1"
    work = args.work or Path(tempfile.mkdtemp(prefix="ftl-gpu-validate-"))
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("HF_DATASETS_CACHE", str(work / "hf-datasets"))
    out = args.out or (work / "out" if args.rehearse else ROOT / "docs" / "validation")
    if args.rehearse and out.resolve().is_relative_to((ROOT / "docs" / "validation").resolve()):
        raise SystemExit("gpu-validate: --rehearse never writes to docs/validation/ (its records are CPU stand-ins)")

    install = [] if args.rehearse or args.no_install else install_kit()

    import torch

    cuda = torch.cuda.is_available()
    if not args.rehearse and not cuda:
        print("gpu-validate: no CUDA device here; use --rehearse for the CPU rehearsal", file=sys.stderr)
        return 2
    gpu = torch.cuda.get_device_name(0) if cuda else None
    tag = "cpu-rehearsal" if args.rehearse else "".join(c if c.isalnum() else "-" for c in (gpu or "gpu").lower()).strip("-")
    records = RecordFile(out / f"{time.strftime('%Y-%m-%d')}-{tag}.jsonl")
    ctx = Context(rehearse=args.rehearse, device="cuda" if cuda else "cpu", gpu=gpu, work=work,
                  deadline=start + args.budget_s, versions=versions(), matrix=matrix)
    smi = nvidia_smi("name,driver_version,memory.total")
    unmet = check_versions()
    records.append({"record": "environment", "schema": SCHEMA, "rehearsal": args.rehearse, "device": ctx.device,
                    "gpu": gpu, "nvidia_smi": smi, "cuda": torch.version.cuda, "versions": ctx.versions,
                    "unmet_requirements": unmet,
                    "install": install, "kit": kit_manifest(), "budget_s": args.budget_s, "argv": sys.argv[1:],
                    "date": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    print(f"gpu-validate: {ctx.device} {gpu or ''} {smi[0] if smi else ''}; torch {ctx.versions['torch']} "
          f"(CUDA {torch.version.cuda}); transformers {ctx.versions['transformers']}; records -> {records.path}", flush=True)
    for line in unmet:  # deepspeed is installed by its entry, when its turn comes
        print(f"gpu-validate: warning: {line}", flush=True)

    counts: dict[str, int] = {}
    for e in entries:
        status = run_entry(ctx, e, records)["status"]
        counts[status] = counts.get(status, 0) + 1
    print(f"gpu-validate: {sum(counts.values())} records ({', '.join(f'{v} {k}' for k, v in sorted(counts.items()))}) "
          f"in {records.path} [{time.monotonic() - start:.0f} s]", flush=True)
    if args.work is None:
        shutil.rmtree(work / "models", ignore_errors=True)  # tens of GB of random weights on a GPU machine
        shutil.rmtree(work / "runs", ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
