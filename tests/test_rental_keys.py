"""Keys first (issue 14, item 5): a missing or refused API key stops `ftl launch` on a rental profile before the
cost question and before any run directory; `--dry-run` says a real launch would stop; `ftl down` and `ftl down
--orphans` name each provider they could not ask and exit non-zero; "could not terminate" only when something
was created. Against the fake providers (tests/fake_providers.py); no sshd, nothing is trained.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from launcher import rundir as R
from launchkit import ftl_env, run_ftl
from tests.fake_providers import FakeLambda, FakeRunPod

ROOT = Path(__file__).resolve().parent.parent
SMOKE = ROOT / "recipes" / "smoke.yaml"


def _profile(tmp_path: Path, provider: str) -> Path:
    d = {"name": f"test-{provider}", "provider": provider, "gpus_per_node": 1, "nodes": 1, "price_per_gpu_hour": 0.5,
         "python": sys.executable, "workdir": str(tmp_path / "remote"), "boot_seconds": 1}
    p = tmp_path / f"{provider}.yaml"
    p.write_text(yaml.safe_dump(d))
    return p


def _ftl(tmp_path: Path, *args: Any, env: dict[str, str] | None = None, stdin: str | None = None):
    e = ftl_env(tmp_path / "runs", drop_prefixes=("RUNPOD_", "LAMBDA_", "FTL_"),
                extra={"FTL_CONFIG_DIR": str(tmp_path / "config"), "FTL_PROVIDER_POLL_S": "0.05", "COLUMNS": "200",
                       "FTL_RUNPOD_API_URL": "http://127.0.0.1:9", "FTL_LAMBDA_API_URL": "http://127.0.0.1:9",
                       **(env or {})})
    if stdin is None:
        return run_ftl(args, cwd=tmp_path, env=e, timeout=120)
    return subprocess.run([sys.executable, "-m", "launcher.cli", *map(str, args)], cwd=tmp_path, env=e, input=stdin,
                          capture_output=True, text=True, timeout=120)


def _at(fake: Any, key: str | None = None) -> dict[str, str]:
    if isinstance(fake, FakeRunPod):
        return {"FTL_RUNPOD_API_URL": fake.url, "RUNPOD_API_KEY": key or fake.key}
    return {"FTL_LAMBDA_API_URL": fake.url, "LAMBDA_API_KEY": key or fake.key}


def _no_runs(tmp_path: Path) -> None:
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").iterdir())


def test_missing_key_stops_before_the_question_and_any_run_directory(tmp_path):
    for extra in ((), ("--yes",)):
        res = _ftl(tmp_path, "launch", SMOKE, "--cluster", _profile(tmp_path, "runpod"), *extra, stdin="y\n")
        assert res.returncode == 2, res.stderr
        assert "RUNPOD_API_KEY" in res.stderr and "credentials.yaml" in res.stderr
        assert "Rent these" not in res.stderr and "expected:" not in res.stderr
        assert "could not terminate" not in res.stderr.lower()
        _no_runs(tmp_path)


def test_refused_key_stops_before_the_question_and_never_shows(tmp_path):
    with FakeRunPod() as fake:
        bad = "rpa_WRONG0key0that0the0fake0refuses"
        res = _ftl(tmp_path, "launch", SMOKE, "--cluster", _profile(tmp_path, "runpod"), "--yes",
                   env=_at(fake, bad))
        assert res.returncode == 2, res.stderr
        assert "refused" in res.stderr and "RUNPOD_API_KEY" in res.stderr and "Rent these" not in res.stderr
        assert bad not in res.stdout + res.stderr and fake.key not in res.stdout + res.stderr
        assert not [r for r in fake.requests if r["method"] == "POST"]
        _no_runs(tmp_path)


def test_dry_run_says_a_real_launch_would_stop(tmp_path):
    prof = _profile(tmp_path, "lambda")
    res = _ftl(tmp_path, "launch", SMOKE, "--cluster", prof, "--dry-run")
    assert res.returncode == 0, res.stderr
    assert "no LAMBDA_API_KEY: a real launch would stop here" in res.stdout + res.stderr
    js = _ftl(tmp_path, "launch", SMOKE, "--cluster", prof, "--dry-run", "--json")
    assert any(w.startswith("no LAMBDA_API_KEY: a real launch would stop here") for w in json.loads(js.stdout)["warnings"])
    with FakeLambda() as fake:  # with a key configured, no such line
        ok = _ftl(tmp_path, "launch", SMOKE, "--cluster", prof, "--dry-run", env=_at(fake))
        assert ok.returncode == 0 and "would stop here" not in ok.stdout + ok.stderr
        assert fake.requests == []  # a dry run asks no provider
    _no_runs(tmp_path)


def test_down_orphans_names_each_provider_it_could_not_ask(tmp_path):
    res = _ftl(tmp_path, "down", "--orphans")
    assert res.returncode != 0 and "no orphaned" not in res.stderr
    assert "RUNPOD_API_KEY" in res.stderr and "LAMBDA_API_KEY" in res.stderr
    with FakeLambda() as fake:
        res = _ftl(tmp_path, "down", "--orphans", env=_at(fake))  # lambda asked, runpod not
        assert res.returncode != 0 and "no orphaned ftl-* instances at lambda" in res.stderr
        assert "could not query runpod" in res.stderr
        one = _ftl(tmp_path, "down", "--orphans", "--provider", "lambda", env=_at(fake))
        assert one.returncode == 0, one.stderr
        assert "no orphaned ftl-* instances at lambda" in one.stderr
        refused = _ftl(tmp_path, "down", "--orphans", "--provider", "lambda", env=_at(fake, "secret_WRONG"))
        assert refused.returncode != 0 and "could not query lambda" in refused.stderr and "no orphaned" not in refused.stderr
    bad = _ftl(tmp_path, "down", "--orphans", "--provider", "aws")
    assert bad.returncode == 2 and "--provider 'aws'" in bad.stderr


def test_down_run_without_a_key_names_the_provider(tmp_path):
    run = R.Run("smoke-20261201-000000", tmp_path / "runs" / "smoke-20261201-000000")
    run.dir.mkdir(parents=True)
    run.update_state(status="failed", backend="runpod", rental={"provider": "runpod"}, instances=[])
    res = _ftl(tmp_path, "down", run.id)
    assert res.returncode != 0 and "could not query runpod" in res.stderr and "RUNPOD_API_KEY" in res.stderr
    assert "could not terminate" not in res.stderr.lower()  # nothing was recorded as created


def test_could_not_terminate_only_when_something_was_created(tmp_path):
    """The key works for the check, then the provider refuses it: the launch fails with nothing created and
    says that it could not look for instances, never that it could not terminate one."""
    with FakeRunPod() as fake:
        fake.fail_next(401, n=50, path_prefix="/v2/c")  # the catalog and the cluster list: refused
        res = _ftl(tmp_path, "launch", SMOKE, "--cluster", _profile(tmp_path, "runpod"), "--yes", env=_at(fake))
        assert res.returncode != 0, res.stderr
        out = res.stdout + res.stderr
        assert "COULD NOT TERMINATE" not in out and "could not check runpod for instances" in out, out[-2000:]
        assert fake.instances == {} and fake.key not in out
