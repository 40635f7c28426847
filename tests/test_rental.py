"""Rented GPUs end to end: `ftl launch` against the fake RunPod / Lambda servers (tests/fake_providers.py), whose
every instance is a real sshd on its own loopback address (127.0.0.21, 127.0.0.22) that accepts only the public
key ftl sent in the create request. Bootstrap, sync, launch, log streaming, fetching and teardown all run for
real on the smoke recipe (CPU, one process per node); `ftl` runs as a subprocess so signals are real too.

The two sshd are started once for the module and handed to each new instance in turn (the fake's on_create
hook writes the key of the create request into that sshd's authorized_keys): instances are cheap to fake,
sshd start-up is not. After every case the fake holds no running instance, and no file of the run (local
or remote copy) nor any output contains the API key or the run's private key.
"""

from __future__ import annotations

import itertools
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import pytest
import yaml

from launcher import rundir as R
from launcher.core import files as F
from launchkit import ftl_env, ok, processes_mentioning, run_ftl, ssh_clients, wait_for
from tests.fake_providers import FakeLambda, FakeRunPod
from tests.multinode import SSH_TOOLS, SshHosts, _run_script, in_ci, require, start_sshd, stop_sshd

ROOT = Path(__file__).resolve().parent.parent
SMOKE = ROOT / "recipes" / "smoke.yaml"
ADDRS = ("127.0.0.21", "127.0.0.22")
TIMEOUT_S = 240

pytestmark = pytest.mark.slow


# --- infrastructure -------------------------------------------------------------------------------


def _port_free(port: int, addr: str) -> bool:
    """Free to listen on, as sshd does it (SO_REUSEADDR: connections of an earlier sshd in TIME_WAIT do not count)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((addr, port))
        except OSError:
            return False
    return True


class Hosts:
    """Two sshd 'machines'; each new instance gets the next one, authorised for the create request's key."""

    def __init__(self, tmp: Path):
        # port 22 where it is free: Lambda reports only an IP (SSH is always <ip>:22)
        self.port22 = all(_port_free(22, a) for a in ADDRS)
        self.sshd = [self._start(tmp / f"sshd{i}", a) for i, a in enumerate(ADDRS)]
        self._next = itertools.cycle(range(len(ADDRS)))
        self.private_keys: list[str] = []  # every run's private key, read while it exists, for the leak check
        self.runs_dir: Path | None = None

    def _start(self, d: Path, addr: str) -> SshHosts:
        if not self.port22:
            return start_sshd(str(d), addrs=(addr,))
        try:
            _run_script("start-sshd.sh", str(d), f"{addr}:22", logs=(d, "sshd_*.log"))
        except BaseException:
            stop_sshd(d)
            raise
        key = d / "id_ed25519"
        return SshHosts(dir=d, key=key, hosts=[{"host": addr, "port": 22, "user": "root", "key": str(key),
                                               "name": "host1"}], ssh_config=d / "ssh_config")

    def reset(self, runs_dir: Path) -> None:
        self._next = itertools.cycle(range(len(ADDRS)))
        self.runs_dir = runs_dir

    def attach(self, public_key: str) -> dict[str, Any]:
        i = next(self._next)
        h = self.sshd[i]
        (h.dir / "authorized_keys").write_text(public_key.strip() + "\n")
        if self.runs_dir is not None:
            for k in self.runs_dir.glob("*/ssh/id_ed25519"):
                text = k.read_text()
                if text not in self.private_keys:
                    self.private_keys.append(text)
        addr = h.hosts[0]["host"]
        return {"ssh_host": addr, "ssh_port": h.hosts[0]["port"], "private_ip": addr}

    def close(self) -> None:
        for h in self.sshd:
            stop_sshd(h)


@pytest.fixture(scope="module")
def hosts(tmp_path_factory):
    require(*SSH_TOOLS)
    h = Hosts(tmp_path_factory.mktemp("rental-sshd"))
    try:
        yield h
    finally:
        h.close()


def _runpod_hook(hosts: Hosts) -> Callable[[dict[str, Any]], dict[str, Any]]:
    return lambda pod: hosts.attach(pod["env"]["PUBLIC_KEY"])


def _lambda_hook(fake: FakeLambda, hosts: Hosts) -> Callable[[dict[str, Any]], dict[str, Any]]:
    def hook(inst: dict[str, Any]) -> dict[str, Any]:
        name = inst["ssh_key_names"][0]
        return hosts.attach(next(k["public_key"] for k in fake.ssh_keys if k["name"] == name))

    return hook


@pytest.fixture
def runpod(hosts, tmp_path):
    with FakeRunPod(ready_after_polls=2) as fake:
        fake.on_create = _runpod_hook(hosts)
        hosts.reset(tmp_path / "runs")
        yield fake
        assert fake.running() == [], "the fake RunPod still holds running instances"
        assert not fake.crashes, fake.crashes


@pytest.fixture
def lambda_(hosts, tmp_path):
    if not hosts.port22:
        msg = f"Lambda instances are reached on port 22: it is taken on {', '.join(ADDRS)} here"
        pytest.fail(msg) if in_ci() else pytest.skip(msg)
    with FakeLambda(ready_after_polls=2) as fake:
        fake.on_create = _lambda_hook(fake, hosts)
        hosts.reset(tmp_path / "runs")
        yield fake
        assert fake.running() == [], "the fake Lambda still holds running instances"
        assert not fake.crashes, fake.crashes


def _profile(tmp_path: Path, provider: str, **extra: Any) -> Path:
    """A rental profile with no GPU (device cpu: the smoke run on one CPU process per node), on this venv's python."""
    d = {"name": f"test-{provider}", "provider": provider, "gpus_per_node": 1, "nodes": 1, "price_per_gpu_hour": 0.5,
         "python": sys.executable, "workdir": str(tmp_path / "remote"), "boot_seconds": 1,
         "setup": ["test -d /tmp"], **extra}
    p = tmp_path / f"{provider}.yaml"
    p.write_text(yaml.safe_dump(d))
    return p


def _env(tmp_path: Path, fake: Any, extra: dict[str, str] | None = None) -> dict[str, str]:
    env = ftl_env(tmp_path / "runs", drop_prefixes=("RUNPOD_", "LAMBDA_", "FTL_"),
                  extra=dict(FTL_PREFLIGHT_TIMEOUT="60", FTL_STOP_GRACE_S="30", FTL_CONFIG_DIR=str(tmp_path / "config"),
                             FTL_PROVIDER_POLL_S="0.2", FTL_LAMBDA_LAUNCH_INTERVAL_S="0",
                             FTL_LAMBDA_REQUEST_INTERVAL_S="0"))
    if isinstance(fake, FakeLambda):  # the 'instances' are this machine, where the sshd lets root in (not ubuntu)
        env["FTL_RENTAL_SSH_USER"] = "root"
    if isinstance(fake, FakeRunPod):
        env.update(RUNPOD_API_KEY=fake.key, FTL_RUNPOD_API_URL=fake.url)
    else:
        env.update(LAMBDA_API_KEY=fake.key, FTL_LAMBDA_API_URL=fake.url)
    env.update(extra or {})
    return env


def ftl(tmp_path: Path, fake: Any, *args: Any, env: dict[str, str] | None = None, background: bool = False,
        timeout: float = TIMEOUT_S):
    return run_ftl(args, cwd=tmp_path, env=_env(tmp_path, fake, env), timeout=timeout, background=background)


def launch(tmp_path: Path, fake: Any, profile: Path, *extra: Any, **kw: Any):
    return ftl(tmp_path, fake, "launch", SMOKE, "--cluster", profile, "--yes", *extra, **kw)


def only_run(tmp_path: Path) -> R.Run:
    runs = R.list_runs(tmp_path / "runs")
    assert len(runs) == 1, [r.id for r in runs]
    return runs[0]


def no_secrets(tmp_path: Path, fake: Any, hosts: Hosts, *outputs: str) -> None:
    """Neither the API key nor any run's private key in any file under tmp_path (runs, remote copies) or output."""
    secrets = [fake.key] + [k for k in hosts.private_keys if k.strip()]
    assert len(secrets) > 1 or not fake.instances, "no private key was captured"
    bodies = [k.strip().splitlines()[1] for k in secrets[1:]] + [fake.key]  # a key body line is enough to leak it
    for text in outputs:
        for s in bodies:
            assert s not in text
    for f in tmp_path.rglob("*"):
        if f.is_file() and not f.is_symlink():
            data = f.read_bytes()
            for s in bodies:
                assert s.encode() not in data, f"secret found in {f}"


def node_processes(tmp_path: Path) -> list[int]:
    """Live processes of a run's nodes on the 'instances' (their command lines name the remote run dir)."""
    return [pid for pid, _ in processes_mentioning(str(tmp_path / "remote"))]


def kill_nodes(tmp_path: Path) -> None:
    """What terminating a real instance does to its processes (the fake cannot: its instances are this machine)."""
    for pid in node_processes(tmp_path):
        try:
            os.killpg(os.getpgid(pid), signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


_ok = ok


def _terminated_all(run: R.Run) -> None:
    st = run.state()
    assert st["instances"] and all(i.get("terminated_at") for i in st["instances"]), st["instances"]
    assert not (run.dir / "ssh" / "id_ed25519").exists()  # the private key goes with the instances


# --- happy paths ----------------------------------------------------------------------------------


def test_runpod_single_node_with_500_and_429_trains_fetches_and_terminates(runpod, hosts, tmp_path):
    runpod.fail_next(429, path_prefix="/v2/pods", retry_after=0, method="GET")  # the key check: retried
    runpod.fail_next(500, path_prefix="/v2/pods", method="POST")  # the first create: not repeated blindly, looked up, then retried
    res = launch(tmp_path, runpod, _profile(tmp_path, "runpod"))
    _ok(res)
    run = only_run(tmp_path)
    st = run.state()
    assert st["status"] == "completed" and st["backend"] == "runpod"
    assert (run.dir / "output" / "adapter_model.safetensors").is_file() or any((run.dir / "output").glob("adapter*"))
    assert run.newest_checkpoint() is not None and (run.dir / "result.json").is_file()
    assert "step 6/6" in (run.dir / "logs" / "launch.log").read_text()  # streamed back over SSH
    assert st["remote_run_dir"] == str(tmp_path / "remote" / "runs" / run.id)
    inst = st["instances"]
    assert len(inst) == 1 and inst[0]["name"] == f"ftl-{run.id}-0"
    creates = [r for r in runpod.requests if r["method"] == "POST" and r["path"] == "/v2/pods"]
    # the create got the 500; the look-up by name found nothing; the create again: one pod
    assert len(creates) == 2 and not runpod._faults and len(runpod.instances) == 1
    _terminated_all(run)
    assert "terminated 1 instance(s)" in res.stderr
    # ftl report: what the provider bills, price x time from the create to the termination
    from launcher.rundir.cost import spend
    from launcher.rundir.cost import report

    cost = report(run)["actual"]
    assert cost["cost_from"].startswith("rented instances") and cost["cost_usd"] == pytest.approx(spend(inst), abs=1e-6)
    t0, t1 = (F.dt.datetime.fromisoformat(inst[0][k].replace("Z", "+00:00")).timestamp() for k in ("created_at", "terminated_at"))
    assert cost["cost_usd"] == pytest.approx(inst[0]["price_per_hour"] * (t1 - t0) / 3600, abs=1e-6) and cost["cost_usd"] > 0
    no_secrets(tmp_path, runpod, hosts, res.stdout, res.stderr)


def test_lambda_two_nodes_meet_on_private_addresses_and_terminate(lambda_, hosts, tmp_path):
    res = launch(tmp_path, lambda_, _profile(tmp_path, "lambda"), "--nodes", 2)
    _ok(res)
    run = only_run(tmp_path)
    st = run.state()
    assert st["status"] == "completed", st
    names = sorted(i["name"] for i in st["instances"])
    assert names == [f"ftl-{run.id}-0", f"ftl-{run.id}-1"]
    assert st["main"]["addr"] == ADDRS[0]  # node 0's private address (the fake's private_ip)
    assert {h["host"] for h in st["hosts"]} == set(ADDRS)
    assert any((run.dir / "output").glob("adapter*"))
    log = (run.dir / "logs" / "launch.log").read_text()
    assert "[node 0]" in log and "[node 1]" in log
    _terminated_all(run)
    no_secrets(tmp_path, lambda_, hosts, res.stdout, res.stderr)


def test_runpod_two_nodes_as_an_instant_cluster(runpod, hosts, tmp_path):
    res = launch(tmp_path, runpod, _profile(tmp_path, "runpod"), "--nodes", 2, "--set", "train.max_steps=3")
    _ok(res)
    run = only_run(tmp_path)
    st = run.state()
    assert st["status"] == "completed" and st["cluster_name"] == f"ftl-{run.id}"
    assert sorted(i["rank"] for i in st["instances"]) == [0, 1] and all(i["cluster_id"] for i in st["instances"])
    assert not any(c["deleted"] is False for c in runpod.clusters.values())
    _terminated_all(run)
    no_secrets(tmp_path, runpod, hosts, res.stdout, res.stderr)


# --- provisioning faults --------------------------------------------------------------------------


def test_no_capacity_says_so_and_leaves_nothing(lambda_, hosts, tmp_path):
    lambda_.no_capacity = True
    res = launch(tmp_path, lambda_, _profile(tmp_path, "lambda"))
    assert res.returncode != 0
    assert "no capacity" in res.stderr.lower() and "try another" in res.stderr.lower()
    assert lambda_.instances == {}
    no_secrets(tmp_path, lambda_, hosts, res.stdout, res.stderr)


def test_never_ready_times_out_and_terminates(runpod, hosts, tmp_path):
    runpod.never_ready = True
    res = launch(tmp_path, runpod, _profile(tmp_path, "runpod"), env={"FTL_PROVIDER_READY_TIMEOUT_S": "2"})
    assert res.returncode != 0 and "not ready after 2s" in res.stderr and "terminated" in res.stderr
    run = only_run(tmp_path)
    assert run.state()["status"] == "failed"
    assert len(runpod.instances) == 1  # created once, then terminated (the fixture checks none runs)
    _terminated_all(run)
    no_secrets(tmp_path, runpod, hosts, res.stdout, res.stderr)


def test_sigint_while_provisioning_terminates(runpod, hosts, tmp_path):
    runpod.never_ready = True
    p = ftl(tmp_path, runpod, "launch", SMOKE, "--cluster", _profile(tmp_path, "runpod"), "--yes", background=True)
    try:
        wait_for(lambda: runpod.running(), 30, "the instance to be created")
        run = wait_for(lambda: (R.list_runs(tmp_path / "runs") or [None])[0], 10, "the run directory")
        wait_for(lambda: run.state().get("instances"), 10, "the instance recorded in state.json")
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 130, err
    assert "terminating the instances" in err
    assert run.state()["status"] == "stopped"
    _terminated_all(run)
    no_secrets(tmp_path, runpod, hosts, out, err)


# --- during training ------------------------------------------------------------------------------


def _until_training(p: subprocess.Popen, tmp_path: Path) -> R.Run:
    run = wait_for(lambda: (R.list_runs(tmp_path / "runs") or [None])[0], 60, "the run directory")
    wait_for(lambda: p.poll() is not None or "step 1/" in run.log_path.read_text(errors="replace")
             if run.log_path.is_file() else False, 120, "the first training step in the streamed log")
    assert p.poll() is None, p.communicate()
    return run


def test_sigint_while_training_checkpoints_fetches_and_terminates(runpod, hosts, tmp_path):
    p = launch(tmp_path, runpod, _profile(tmp_path, "runpod"), "--set", "train.max_steps=400", background=True)
    try:
        run = _until_training(p, tmp_path)
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
    st = run.state()
    assert st["status"] == "stopped", (st, err[-3000:])
    ckpt = run.newest_checkpoint()
    assert ckpt is not None  # saved on the instance at the stop, and fetched
    _terminated_all(run)
    assert not node_processes(tmp_path)
    # nothing was lost: a re-run rents a new instance, sends the checkpoint up and finishes from there
    res = ftl(tmp_path, runpod, "launch", "--resume", run.id, "--yes")
    _ok(res)
    st = run.state()
    assert st["status"] == "completed" and len(st["instances"]) == 2 and runpod.running() == []
    assert sorted(m["step"] for m in R.read_metrics(run.metrics_path) if "loss" in m) == list(range(1, 401))
    assert f"resuming from" in res.stdout + run.log_path.read_text() and ckpt.name in run.log_path.read_text()
    _terminated_all(run)
    no_secrets(tmp_path, runpod, hosts, out, err, res.stdout, res.stderr)


def test_ssh_drop_mid_run_reconnects_and_finishes(runpod, hosts, tmp_path):
    """Every SSH connection ftl holds to the instance dies mid-run: training goes on there, the log stream
    comes back, results are fetched and the instance terminated."""
    p = launch(tmp_path, runpod, _profile(tmp_path, "runpod"), "--set", "train.max_steps=300", background=True)
    try:
        run = _until_training(p, tmp_path)
        for pid in ssh_clients():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        out, err = p.communicate(timeout=240)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 0, err[-3000:]
    log = run.log_path.read_text()
    assert run.state()["status"] == "completed" and "lost the log stream" in log
    steps = [line for line in log.splitlines() if line.startswith("step ") and " loss " in line]
    assert [int(s.split()[1].split("/")[0]) for s in steps] == list(range(1, 301))  # each once, none lost
    assert (run.dir / "output" / "adapter_config.json").is_file()
    _terminated_all(run)
    no_secrets(tmp_path, runpod, hosts, out, err)


def test_instance_lost_mid_run_keeps_the_checkpoint_synced_back(runpod, hosts, tmp_path):
    """The instance dies for good mid-run (unreachable, its processes gone): the newest complete checkpoint
    that came back while training is there, the run fails naming the node, and it is terminated."""
    p = launch(tmp_path, runpod, _profile(tmp_path, "runpod"), "--set", "train.max_steps=3000", "--set",
               "train.save_steps=20", background=True,
               env={"FTL_SYNC_EVERY_S": "1", "FTL_UNREACHABLE_S": "5"})
    try:
        run = _until_training(p, tmp_path)
        wait_for(lambda: run.state().get("synced_checkpoint"), 120, "a checkpoint synced back while training")
        for h in hosts.sshd:  # the instance becomes unreachable ...
            (h.dir / "authorized_keys").write_text("")
        for pid in ssh_clients() + node_processes(tmp_path):  # ... its connections drop, its processes die
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        out, err = p.communicate(timeout=180)
    finally:
        if p.poll() is None:
            p.kill()
    st = run.state()
    assert p.returncode != 0 and st["status"] == "failed" and "node 0" in (st.get("error") or ""), (st, err[-3000:])
    ckpt = run.newest_checkpoint()
    assert ckpt is not None and ckpt.name == st["synced_checkpoint"] and (ckpt / "COMPLETE").is_file()
    assert (run.dir / "metrics.jsonl").is_file()
    _terminated_all(run)
    assert not node_processes(tmp_path)
    no_secrets(tmp_path, runpod, hosts, out, err)


def test_budget_reached_mid_run_checkpoints_fetches_and_terminates(runpod, hosts, tmp_path):
    # $3600/h = $1 a second for the pod: a $40 cap is reached some 40 s after the create (boot, bootstrap,
    # sync and model load take ~10 s here), well inside a 5000-step run (~0.07 s a step here)
    for g in runpod.gpus:
        g["price"] = {"secure": 3600.0, "community": 3600.0, "serverless": 3600.0}
    res = launch(tmp_path, runpod, _profile(tmp_path, "runpod"), "--set", "train.max_steps=5000", "--set",
                 "train.save_steps=100", "--budget", 40)
    run = only_run(tmp_path)
    st = run.state()
    assert res.returncode != 0 and st["status"] == "stopped", (st, res.stderr[-3000:])
    assert "budget reached" in (st.get("error") or "") and "budget reached" in res.stderr
    assert run.newest_checkpoint() is not None
    _terminated_all(run)
    assert not node_processes(tmp_path)
    no_secrets(tmp_path, runpod, hosts, res.stdout, res.stderr)


def test_kill_9_then_down_orphans_terminates_what_was_left(lambda_, hosts, tmp_path):
    p = launch(tmp_path, lambda_, _profile(tmp_path, "lambda"), "--set", "train.max_steps=400", background=True)
    try:
        run = _until_training(p, tmp_path)
        p.send_signal(signal.SIGKILL)
        out, err = p.communicate(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
    try:
        assert len(lambda_.running()) == 1  # nothing could clean up
        ps = ftl(tmp_path, lambda_, "ps", env={"COLUMNS": "250"})
        _ok(ps)
        assert f"ftl-{run.id}-0" in ps.stdout and "orphans" in ps.stdout
        down = ftl(tmp_path, lambda_, "down", "--orphans", "--provider", "lambda")  # runpod has no key here
        _ok(down)
        assert f"ftl-{run.id}-0" in down.stderr
        assert lambda_.running() == []
        assert all(i.get("terminated_at") for i in run.state()["instances"])
        # the nodes trained on without ftl; before terminating, they saved a checkpoint and it came back
        assert "save a checkpoint" in down.stderr
        ckpt = run.newest_checkpoint()
        assert ckpt is not None and (ckpt / "COMPLETE").is_file() and (run.dir / "metrics.jsonl").is_file()
        assert run.state()["status"] == "stopped"
        again = ftl(tmp_path, lambda_, "down", "--orphans", "--provider", "lambda")
        _ok(again)
        assert "no orphaned" in again.stderr
    finally:
        kill_nodes(tmp_path)
    no_secrets(tmp_path, lambda_, hosts, out, err, ps.stdout, down.stderr)


# --- without renting ------------------------------------------------------------------------------


def test_launch_shows_cost_and_asks_before_renting(tmp_path):
    with FakeRunPod() as fake:
        prof = _profile(tmp_path, "runpod", gpu="a100-80gb", price_per_gpu_hour=1.89)
        p = subprocess.run([sys.executable, "-m", "launcher.cli", "launch", SMOKE, "--cluster", prof, "--budget", "3"],
                           cwd=tmp_path, env=_env(tmp_path, fake), input="n\n", capture_output=True, text=True,
                           timeout=120)
        assert p.returncode == 1, p.stderr
        assert "expected:" in p.stderr and "boot and weight download included" in p.stderr and "$3.00" in p.stderr
        assert "Rent these instances and launch?" in p.stderr
        assert fake.instances == {} and not [r for r in fake.requests if r["method"] == "POST"]


def test_spend_is_price_times_time_since_creation():
    from launcher.rundir.cost import spend

    rows = [{"price_per_hour": 3.6, "created_at": "2026-01-01T00:00:00Z", "terminated_at": "2026-01-01T00:10:00Z"},
            {"price_per_hour": 1.0, "created_at": "2026-01-01T00:00:00Z", "terminated_at": None}]
    now = 1767225600.0 + 3600  # 2026-01-01T01:00:00Z
    assert abs(spend(rows, now) - (0.6 + 1.0)) < 1e-9
