"""Issue 16 items 1-3: the live view of training (a bar with step/total, loss, ETA, from rank 0's metrics.jsonl),
third-party output kept in the log, and ftl ps / ftl status in human numbers at 80 columns."""

from __future__ import annotations

import io
import json
import os
import re
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest
from rich.console import Console

from launcher import rundir as R
from launcher.cli.commands import runs_table, status_table
from launcher.cli.live import LiveView, ftl_line, pause_for
from launcher.core import files as F
from launcher.rundir.progress import run_progress, summarize

ROOT = Path(__file__).resolve().parents[1]
QUICK = ROOT / "recipes" / "quickstart.yaml"
T0 = 1_800_000_000.0  # a fixed "now" (2027-01-15)


def _iso(t: float) -> str:
    import datetime as dt

    return dt.datetime.fromtimestamp(t, dt.timezone.utc).isoformat(timespec="seconds")


def _records(n: int, every: int = 10, start: float = T0, per_step: float = 2.0, total: int = 120):
    return [{"time": start + 30 + s * per_step, "step": s, "max_steps": total, "epoch": s / 120, "loss": 8.0 - s / 20,
             "num_tokens": 1000.0 * s} for s in range(every, n + 1, every)]


def test_progress_reads_step_total_eta_loss_and_tokens_per_second():
    recs = _records(40)
    now = recs[-1]["time"] + 1
    p = summarize(recs, {"started": _iso(T0), "status": "running"}, None, now=now)
    assert (p.step, p.total) == (40, 120)
    assert p.eta_s == pytest.approx(2.0 * 80 - 1)  # 2 s a step between the records, 1 s since the last
    assert p.tokens_per_s == pytest.approx(500.0)
    assert p.loss == pytest.approx(sum(8.0 - s / 20 for s in (10, 20, 30, 40)) / 4)  # smoothed
    assert p.last_loss == pytest.approx(6.0) and p.elapsed_s == pytest.approx(now - T0)


def test_progress_of_a_finished_run_has_its_final_loss_and_no_eta():
    recs = _records(120) + [{"time": T0 + 300, "step": 120, "max_steps": 120, "train_loss": 6.5, "train_runtime": 250}]
    p = summarize(recs, {"started": _iso(T0), "ended": _iso(T0 + 310)},
                  {"global_step": 120, "max_steps": 120, "final_loss": 2.0, "eval": {"eval_loss": 2.5}}, now=T0 + 9999)
    assert (p.step, p.total, p.eta_s, p.last_loss, p.eval_loss) == (120, 120, None, 2.0, 2.5)
    assert p.elapsed_s == pytest.approx(310)


def test_one_record_gives_a_first_eta_from_the_start():
    p = summarize(_records(10), {"started": _iso(T0)}, None, now=T0 + 50)
    assert p.eta_s is not None and p.eta_s > 0


def test_the_trainer_log_line_is_compact():
    from launcher.train.callbacks import log_line

    logs = {"loss": 6.2551234, "grad_norm": 2.342, "learning_rate": 0.0019191, "entropy": 6.656,
            "mean_token_accuracy": 0.1769, "num_tokens": 11760.0, "epoch": 0.1681}
    line = log_line(20, 120, 0.16806, logs)
    assert line == "step 20/120  epoch 0.17  loss 6.255  lr 0.001919  grad_norm 2.342", line
    evals = {"eval_loss": 5.912345, "eval_runtime": 1.2, "eval_samples_per_second": 41.2, "eval_entropy": 6.1,
             "eval_num_tokens": 11760.0, "eval_mean_token_accuracy": 0.2012}
    assert log_line(50, 120, 0.42, evals) == "step 50/120  epoch 0.42  eval_loss 5.912  eval_mean_token_accuracy 0.2012"


@pytest.mark.parametrize("line", [
    "[2026-12-06 21:37:05,867] [WARNING] [real_accelerator.py:213:get_accelerator] Setting accelerator to CPU.",
    "/x/torch/utils/checkpoint.py:85: FutureWarning: `torch.cpu.amp.autocast(args...)` is deprecated.",
    "Failed to load CPU gemm_4bit_forward from kernels-community: No module named 'kernels'",
    "step 5/120  epoch 0.04  loss 8.1",
])
def test_third_party_lines_and_step_lines_are_not_ftl_lines(line):
    assert ftl_line(line) is None


def test_ftl_lines_are_shown_without_their_logger_prefix():
    assert ftl_line("21:37:11 [ftl rank 0] INFO checkpoint /r/checkpoint-50 complete") == \
        "21:37:11 checkpoint /r/checkpoint-50 complete"
    assert "warning:" in ftl_line("21:37:05 [ftl rank 0] WARNING training from RANDOM weights")
    assert ftl_line("[ftl] stop requested: saving a checkpoint") is not None
    assert ftl_line("[node 1] 21:37:11 [ftl rank 8] WARNING slow") == "21:37:11 [yellow]warning:[/] slow"
    assert pause_for("Building extension module cpu_adam...") == "compiling DeepSpeed's CPU Adam once, ~2 min"
    assert pause_for("Using /root/.cache/torch_extensions/py311_cpu/cpu_adam/build.ninja...") is not None


def _run(tmp_path: Path, status: str = "running", **state) -> R.Run:
    run = R.create_run_dir("quickstart", tmp_path / "runs")
    F.write_json(run.state_path, {**R.initial_state(run, "quickstart"), "status": status, **state})
    F.write_json(run.plan_path, {"strategy": "ddp", "world_size": 1, "device": "cpu"})
    return run


def test_the_view_shows_ftl_lines_and_keeps_the_libraries_in_the_log(tmp_path):
    run = _run(tmp_path, started=_iso(time.time() - 60))
    run.log_path.parent.mkdir(parents=True, exist_ok=True)
    run.log_path.write_text(
        "[2026-12-06 21:37:05,867] [WARNING] [real_accelerator.py:213:get_accelerator] Setting accelerator to CPU.\n"
        "21:37:11 [ftl rank 0] INFO lora sft on cpu: ddp world 1 (NO); 131072 of 984192 parameters train\n"
        "Building extension module cpu_adam...\n")
    out = io.StringIO()
    view = LiveView(run, run.log_path, Console(file=out, width=80, force_terminal=True), poll_s=0.05)
    with view:
        time.sleep(0.3)
        assert "compiling DeepSpeed's CPU Adam once" in view.info(run_progress(run), view.waiting)
        with open(run.metrics_path, "a") as f:
            for r in _records(20, per_step=1.0, start=time.time() - 50):
                f.write(json.dumps(r) + "\n")
        with open(run.log_path, "a") as f:
            f.write("step 20/120  loss 7.0\n21:38:00 [ftl rank 0] INFO checkpoint /r/checkpoint-20 complete\n")
        time.sleep(0.3)
    text = re.sub(r"\x1b\[[0-?]*[ -/]*[@-~]", "", out.getvalue())
    assert "131072 of 984192 parameters train" in text and "checkpoint /r/checkpoint-20 complete" in text
    assert "Setting accelerator" not in text and "cpu_adam" not in text and "step 20/120" not in text
    assert "20/120" in text and "ETA" in text and "loss 7.2" in text
    assert view.waiting is None  # the first step line ends the pause


def _finished(tmp_path: Path) -> R.Run:
    run = _run(tmp_path, "completed", started="2026-01-02T03:04:05+00:00", ended="2026-01-02T03:09:06+00:00",
               returncode=0)
    with open(run.metrics_path, "w") as f:
        for r in _records(120, per_step=2.0, start=1767323045.0):
            f.write(json.dumps(r) + "\n")
        f.write(json.dumps({"time": 1767323346.0, "step": 120, "train_loss": 6.5, "train_runtime": 250.4}) + "\n")
    F.write_json(run.result_path, {"status": "completed", "global_step": 120, "max_steps": 120,
                                   "first_loss": 8.078683471679687, "final_loss": 5.036830139160156,
                                   "train_runtime_s": 250.4, "eval": {"eval_loss": 5.1234567},
                                   "params": {"total": 984192, "trainable": 131072}})
    return run


def _render(table) -> str:
    out = io.StringIO()
    Console(file=out, width=80, color_system=None).print(table, highlight=False)
    return out.getvalue()


def _lines(text: str) -> list[str]:
    return [ln.rstrip() for ln in text.splitlines()]


PS_GOLDEN = """\
id                           status      where     steps   elapsed   ETA    loss
────────────────────────────────────────────────────────────────────────────────
{id}   completed   local   120/120      5:01         5.037"""

STATUS_GOLDEN = """\
 run        │ {id}
 status     │ completed
 recipe     │ quickstart
 plan       │ ddp · 1 process(es) on cpu
 started    │ 2026-01-02 03:04 UTC
 ended      │ 2026-01-02 03:09 UTC
 progress   │ step 120/120 · elapsed 5:01
 loss       │ last 5.037 · smoothed 3 · eval 5.123
 checkpoint │ none complete
 result     │ completed · step 120/120 · loss 8.079 → 5.037 · eval loss 5.123 ·
            │ trained in 4.2 min · 131,072 of 984,192 parameters trained"""


def test_ps_golden_at_80_columns(tmp_path):
    from launcher.cli.commands import _run_row

    run = _finished(tmp_path)
    text = _render(runs_table([_run_row(run)]))
    assert max(map(len, text.splitlines())) <= 80, text
    assert _lines(text) == PS_GOLDEN.format(id=run.id).splitlines(), text


def test_status_golden_at_80_columns(tmp_path):
    run = _finished(tmp_path)
    st = run.state()
    out = {"dir": str(run.dir), "strategy": "ddp", "device": "cpu", "world_size": 1, "checkpoint": None,
           "result": run.result(), "log": str(run.log_path), "progress": run_progress(run, st).to_json()}
    text = _render(status_table(run, st, out))
    assert max(map(len, text.splitlines())) <= 80, text
    golden = STATUS_GOLDEN.format(id=run.id).splitlines()
    assert _lines(text)[:len(golden)] == golden, text  # then dir and log (paths)
    assert "{" not in text and "e+09" not in text and "None" not in text


# -- a real launch in a pseudo-terminal -------------------------------------------------------------------


def _pty_run(args: list[str], env: dict[str, str], timeout: float) -> tuple[int, str]:
    import pty

    master, slave = pty.openpty()
    import fcntl
    import struct
    import termios

    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
    p = subprocess.Popen(args, stdin=slave, stdout=slave, stderr=slave, env=env, cwd=ROOT, close_fds=True)
    os.close(slave)
    chunks, deadline = [], time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            r, _, _ = select.select([master], [], [], 1.0)
            if r:
                try:
                    c = os.read(master, 65536)
                except OSError:  # the child closed the terminal
                    break
                if not c:
                    break
                chunks.append(c)
            elif p.poll() is not None:
                break
        else:
            p.kill()
            pytest.fail(f"{' '.join(args)} did not finish in {timeout} s:\n" + b"".join(chunks).decode()[-3000:])
        rc = p.wait(timeout=60)
    finally:
        os.close(master)
        if p.poll() is None:
            p.kill()
    return rc, b"".join(chunks).decode(errors="replace")


@pytest.mark.skipif(not QUICK.is_file(), reason="recipes/quickstart.yaml missing")
def test_launch_on_a_terminal_shows_the_bar_and_eta_and_no_library_warnings(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "MASTER_", "SLURM_", "FTL_"))}
    env.update(FTL_NO_GPU_DETECT="1", FTL_RUNS_DIR=str(tmp_path / "runs"), HF_HUB_OFFLINE="1", TERM="xterm",
               TOKENIZERS_PARALLELISM="false", COLUMNS="80", LINES="24", OMP_NUM_THREADS="1")
    env.pop("NO_COLOR", None)
    rc, out = _pty_run([sys.executable, "-m", "launcher.cli", "launch", str(QUICK), "--set", "train.max_steps=4",
                        "--set", "train.logging_steps=1", "--set", "train.save_steps=4"], env, timeout=400)
    text = re.sub(r"\x1b\[[0-?]*[ -/]*[@-~]", "", out).replace("\r", "\n")
    assert rc == 0, text[-3000:]
    assert re.search(r"[0-9]/4 .*ETA \d+:\d\d", text), text[-3000:]  # the bar with its ETA
    assert "4/4" in text and "tok/s" in text and "completed" in text
    assert "checkpoint-4 complete" in text  # ftl's own lines, with the parameter count ftl estimate gives
    assert "131,072 of 984,192 parameters train (the total counts the LoRA adapters" in text
    for noise in ("Warning", "WARNING]", "Setting accelerator", "gemm_4bit", "warnings.warn"):
        assert noise not in text, (noise, text[-3000:])
    run = R.list_runs(tmp_path / "runs")[0]
    log = run.log_path.read_text()
    assert "step 4/4" in log  # the plain lines are in the log
    p = run_progress(run)
    assert (p.step, p.total) == (4, 4) and p.last_loss is not None


QUIET = """
import logging, sys, warnings
from pathlib import Path
from launcher.cli.quiet import libraries_to
with libraries_to(Path(sys.argv[1]), verbose=sys.argv[2] == "1"):
    logging.getLogger("bitsandbytes.backends.cpu.ops").warning("Failed to load CPU gemm_4bit_forward")
    warnings.warn("torch.cpu.amp.autocast is deprecated", FutureWarning)
print("done")
"""


def test_library_notices_of_in_process_commands_go_to_the_log(tmp_path):
    log = tmp_path / "logs" / "merge.log"
    quiet = subprocess.run([sys.executable, "-c", QUIET, str(log), "0"], capture_output=True, text=True, cwd=ROOT)
    assert quiet.stdout == "done\n" and quiet.stderr == "", quiet.stderr
    assert "gemm_4bit_forward" in log.read_text() and "FutureWarning" in log.read_text()
    loud = subprocess.run([sys.executable, "-c", QUIET, str(log), "1"], capture_output=True, text=True, cwd=ROOT)
    assert "gemm_4bit_forward" in loud.stderr and "FutureWarning" in loud.stderr  # -v shows them


def test_logs_follow_on_a_terminal_shows_the_live_view(tmp_path, monkeypatch):
    import threading

    from typer.testing import CliRunner

    from launcher.cli import app, commands

    monkeypatch.setenv("FTL_RUNS_DIR", str(tmp_path / "runs"))
    run = _run(tmp_path, started=_iso(time.time() - 30), pid=os.getpid(), pgid=os.getpgid(0),
               launcher_pid=os.getpid())
    run.log_path.parent.mkdir(parents=True, exist_ok=True)
    run.log_path.write_text("Setting accelerator to CPU.\n21:37:11 [ftl rank 0] INFO data: 950 training examples\n")
    with open(run.metrics_path, "w") as f:
        for r in _records(20, per_step=1.0, start=time.time() - 25):
            f.write(json.dumps(r) + "\n")
    monkeypatch.setattr(commands, "run_status", lambda r: r.state().get("status"))
    buf = io.StringIO()
    monkeypatch.setattr(commands, "console", Console(file=buf, width=80, force_terminal=True))
    threading.Timer(1.5, lambda: run.update_state(status="completed", ended=_iso(time.time()))).start()
    res = CliRunner().invoke(app, ["logs", run.id, "-f"])
    assert res.exit_code == 0, res.output
    text = re.sub(r"\x1b\[[0-?]*[ -/]*[@-~]", "", buf.getvalue())
    assert "20/120" in text and "data: 950 training examples" in text and "Setting accelerator" not in text


def test_verbose_shows_every_line_and_a_quiet_failure_keeps_the_log_tail(tmp_path):
    run = _run(tmp_path, started=_iso(time.time() - 5))
    run.log_path.parent.mkdir(parents=True, exist_ok=True)
    lines = ["Setting accelerator to CPU.", "step 1/4  loss 8.1", "Traceback (most recent call last):",
             "RuntimeError: boom"]
    run.log_path.write_text("\n".join(lines) + "\n")
    for verbose in (True, False):
        out = io.StringIO()
        with LiveView(run, run.log_path, Console(file=out, width=80, force_terminal=True), verbose=verbose,
                      poll_s=0.05) as view:
            time.sleep(0.2)
        text = re.sub(r"\x1b\[[0-?]*[ -/]*[@-~]", "", out.getvalue())
        assert ("Setting accelerator" in text and "RuntimeError: boom" in text) is verbose, text
        assert view.failed_tail() == ([] if verbose else lines)  # shown after a failure when they were hidden


def test_status_of_a_running_run_has_step_total_elapsed_eta_and_loss(tmp_path):
    start = 1767323045.0  # 2026-01-02 03:04:05 UTC
    run = _run(tmp_path, "running", started=_iso(start), pid=12345)
    with open(run.metrics_path, "w") as f:
        for r in _records(40, per_step=2.0, start=start):
            f.write(json.dumps(r) + "\n")
    st = run.state()
    out = {"dir": str(run.dir), "strategy": "ddp", "device": "cpu", "world_size": 1, "checkpoint": None,
           "result": None, "log": str(run.log_path), "progress": run_progress(run, st, now=start + 111).to_json()}
    rows = _lines(_render(status_table(run, st, out)))
    assert " progress   │ step 40/120 · elapsed 1:51 · ETA 2:39" in rows, rows  # 2 s a step × 80, 1 s since
    assert " loss       │ last 6 · smoothed 6.75" in rows and " pid        │ 12345" in rows, rows
