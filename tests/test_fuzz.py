"""Bad input never crashes, hangs or writes (issue 15, item 7): a seeded, bounded property-based fuzz.

Shipped recipes and profiles with one or two keys replaced by hostile values (huge and non-finite
numbers, booleans, strings that look like numbers or paths, nested containers, unknown keys), and
cluster profiles likewise (through estimate and a launch dry run), and command lines with hostile
--set / --budget / --deadline / --top / --max-gpus values, through `ftl estimate --json` and `ftl plan
--json` in-process (typer's CliRunner). Every input must end in exit 0
with JSON that parses everywhere (no NaN or Infinity, integers within int64) or in exit 2 with one
line that names the file or flag and the key; never a traceback, never a hang, never a file written
(catalog models only: the fuzz cannot reach a first-time architecture probe). The time bounds guard
against hangs (the alias floods and hub retries of the issue took 16-25 s and more) with room for a
loaded CI machine; speed itself is bench/estimate_speed.py's.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from launcher.cli.commands import app
from launcher.estimate import probed

ROOT = Path(__file__).resolve().parent.parent
RECIPES = ["quickstart.yaml", "llama3-8b-qlora.yaml", "distilbert-imdb-lora.yaml", "qwen2.5-0.5b-dapt.yaml",
           "llama3-1b-dpo.yaml"]
PROFILES = ["h100-2x8-ib.yaml", "runpod-8xh100.yaml"]
FUZZ = settings(max_examples=250, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
INT64 = 2**63 - 1
HANG_S = {"estimate": 10.0, "plan": 30.0}

HOSTILE = st.one_of(
    st.integers(min_value=-(10**30), max_value=10**30),
    st.sampled_from([0, -1, 1, 2**31, 2**63, 10**400, 1.5, 1e308, 1e-320, -0.0]),
    st.sampled_from([float("inf"), float("-inf"), float("nan")]),
    st.booleans(),
    st.none(),
    st.sampled_from(["", "1", "1.0", "1e400", "inf", "nan", "yes", "1:30", "0x10", "auto", "all-linear", "/", "/proc",
                     "../../etc/passwd", "a" * 5000, "x\x00y", "~", "-1", "9999999999999999d", "q_proj"]),
    st.text(max_size=30),
    st.lists(st.integers(min_value=-3, max_value=3), max_size=3),
    st.dictionaries(st.sampled_from(["a", "r", "path", "gpu"]), st.integers(0, 3), max_size=2),
)


def _paths(d: Any, prefix: tuple = ()) -> list[tuple]:
    out = []
    if isinstance(d, dict):
        for k, v in d.items():
            out.append(prefix + (k,))
            out += _paths(v, prefix + (k,))
    return out


def _set(d: dict, path: tuple, value: Any) -> None:
    for k in path[:-1]:
        d = d[k]
    d[path[-1]] = value


def _json_ok(obj: Any) -> None:
    """JSON as issue 15 item 5 wants it: finite floats, integers within int64."""
    if isinstance(obj, bool) or obj is None or isinstance(obj, str):
        return
    if isinstance(obj, int):
        assert -INT64 - 1 <= obj <= INT64, obj
    elif isinstance(obj, float):
        assert math.isfinite(obj), obj
    elif isinstance(obj, dict):
        for v in obj.values():
            _json_ok(v)
    elif isinstance(obj, list):
        for v in obj:
            _json_ok(v)


@pytest.fixture(scope="module")
def runner():
    return CliRunner()


@pytest.fixture(autouse=True)
def _no_probe(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the fuzz reached a first-time architecture probe")

    monkeypatch.setattr(probed, "_run_probe", refuse)


def _listing(where: Path) -> list[str]:
    return sorted(p.name for p in where.iterdir()) if where.is_dir() else []


def _check(runner: CliRunner, args: list[str], where: Path, names: list[str]) -> None:
    runs = Path.cwd() / "runs"  # where a launch would put its run directory (a dry run writes nothing)
    before, runs_before = _listing(where), _listing(runs)
    t0 = time.perf_counter()
    res = runner.invoke(app, args, catch_exceptions=True)
    took = time.perf_counter() - t0
    after = _listing(where)
    assert before == after, f"{args}: wrote {set(after) - set(before)}"
    assert runs_before == _listing(runs), f"{args}: wrote a run directory"
    if res.exception is not None and not isinstance(res.exception, SystemExit):
        raise AssertionError(f"{args}: {type(res.exception).__name__}: {res.exception}") from res.exception
    assert res.exit_code in (0, 2), (args, res.exit_code, res.output[-500:])
    assert took < HANG_S.get(args[0], 10.0), (args, took)
    if res.exit_code == 0:
        _json_ok(json.loads(res.stdout))
        return
    err = res.stderr.strip()
    assert err.startswith("error:") and "Traceback" not in err, (args, err[:500])
    assert len(err) < 4000, (args, len(err))
    assert any(n in err for n in names), (args, err[:500])


@FUZZ
@given(recipe=st.sampled_from(RECIPES), data=st.data())
def test_mutated_recipes(runner, tmp_path_factory, recipe, data):
    raw = yaml.safe_load((ROOT / "recipes" / recipe).read_text())
    # the recipe moves to a temporary folder: its relative paths become absolute first
    for owner, key in ((raw, "model"), (raw.get("data") or {}, "path")):
        if isinstance(owner.get(key), str) and (ROOT / "recipes" / owner[key]).exists():
            owner[key] = str(ROOT / "recipes" / owner[key])
    paths = _paths(raw)
    chosen = data.draw(st.lists(st.sampled_from(paths), min_size=1, max_size=2, unique=True))
    for p in chosen:
        try:
            _set(raw, p, data.draw(HOSTILE))
        except (TypeError, KeyError):
            pass  # an earlier change replaced the parent
    folder = tmp_path_factory.mktemp("fuzz")
    path = folder / "r.yaml"
    text = yaml.safe_dump(raw, allow_unicode=True)
    path.write_text(text.replace("\x00", "\\0"), encoding="utf-8")
    names = [str(path), path.name] + [str(p[-1]) for p in chosen] + [".".join(map(str, p)) for p in chosen]
    _check(runner, ["estimate", str(path), "--json"], folder, names)


@FUZZ
@given(recipe=st.sampled_from(RECIPES), key=st.sampled_from(
    ["train.micro_batch_size", "train.lr", "data.max_seq_len", "lora.r", "train.epochs", "cluster.nodes",
     "cluster.gpus_per_node", "cluster.price_per_gpu_hour", "train.precision", "method", "model", "data.path",
     "estimate.headroom", "parallel.strategy", "nonsense.key", "train"]), value=HOSTILE)
def test_mutated_set_flags(runner, tmp_path_factory, recipe, key, value):
    text = value if isinstance(value, str) else json.dumps(value) if not isinstance(value, float) else repr(value)
    folder = tmp_path_factory.mktemp("fuzz")
    _check(runner, ["estimate", str(ROOT / "recipes" / recipe), "--set", f"{key}={text}", "--json"], folder,
           ["--set", key, key.split(".")[-1]])


@settings(max_examples=30, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(flag=st.sampled_from(["--budget", "--deadline", "--top", "--max-gpus"]), value=HOSTILE)
def test_mutated_plan_flags(runner, tmp_path_factory, flag, value):
    text = value if isinstance(value, str) else str(value)
    folder = tmp_path_factory.mktemp("fuzz")
    if text.startswith("-") and text not in ("-1",):
        return  # a flag-looking value is the parser's to reject
    _check(runner, ["plan", str(ROOT / "recipes" / "llama3-8b-qlora.yaml"), "--clusters",
                    str(ROOT / "cluster" / PROFILES[0]), flag, text, "--json"], folder, [flag])


@pytest.mark.parametrize("args,words", [
    (["plan", "RECIPE", "--budget", "abc"], "Invalid value for '--budget'"),
    (["estimate"], "Missing argument 'RECIPE'"),
    (["estimate", "RECIPE", "--nope"], "No such option: --nope"),
    (["estimate", "RECIPE", "--nodes", "two"], "Invalid value for '--nodes'"),
])
def test_usage_errors_are_one_line(runner, args, words):
    """A bad flag value, an unknown option, a missing argument: one `error:` line naming it, exit 2."""
    args = [str(ROOT / "recipes" / "quickstart.yaml") if a == "RECIPE" else a for a in args]
    res = runner.invoke(app, args)
    assert res.exit_code == 2
    err = res.stderr.strip()
    assert err.startswith("error:") and words in err and "--help" in err and len(err.splitlines()) == 1, err


@FUZZ
@given(profile=st.sampled_from(sorted(p.name for p in (ROOT / "cluster").glob("*.yaml"))), data=st.data())
def test_mutated_profiles(runner, tmp_path_factory, profile, data):
    """Cluster profiles with one or two keys replaced (or added) through estimate --cluster and a launch dry
    run: the profile file is named in every error."""
    raw = yaml.safe_load((ROOT / "cluster" / profile).read_text())
    keys = sorted(raw) + ["gpu", "nodes", "gpus_per_node", "price_per_gpu_hour", "inter_node_bandwidth_gbps",
                          "provider", "hosts", "budget", "sbatch_options", "unknown_key"]
    chosen = data.draw(st.lists(st.sampled_from(keys), min_size=1, max_size=2, unique=True))
    for k in chosen:
        raw[k] = data.draw(HOSTILE)
    folder = tmp_path_factory.mktemp("fuzz")
    path = folder / "c.yaml"
    path.write_text(yaml.safe_dump(raw, allow_unicode=True).replace("\x00", "\\0"), encoding="utf-8")
    names = [str(path), path.name, "--cluster"] + chosen
    command = data.draw(st.sampled_from(["estimate", "launch"]))
    args = [command, str(ROOT / "recipes" / "llama3-8b-qlora.yaml"), "--cluster", str(path), "--json"]
    if command == "launch":
        args.append("--dry-run")
    _check(runner, args, folder, names)
