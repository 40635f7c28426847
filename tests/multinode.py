"""Multi-node test infrastructure: a real 2-node SLURM cluster and two real sshd "hosts", on this box.

Session fixtures (made available to every test by tests/conftest.py):

* ``slurm_cluster`` -> :class:`SlurmCluster`: a private munged + slurmctld + two slurmd (``node1``,
  ``node2``, 2 CPUs and 2 fake GPUs each, partition ``debug``) started by tests/infra/start-slurm.sh.
  Clients need ``cluster.env`` (SLURM_CONF, and PATH with tests/infra/bin first so that ``sacct``
  is the stand-in that answers from scontrol; there is no accounting daemon). The fixture does not
  touch ``os.environ``: pass ``env=cluster.environ()`` to subprocesses, or call
  ``cluster.apply(monkeypatch)`` in a test that runs submitit in-process.
* ``ssh_hosts`` -> :class:`SshHosts`: two sshd processes, on 127.0.0.2 and 127.0.0.3 (same port),
  accepting root logins with the key ``ssh_hosts.key`` (tests/infra/start-sshd.sh).

Both stop everything they started at session end, by PID (tests/infra/stop-*.sh; the SLURM one also
kills the processes of jobs still running). Both nodes and both hosts are this machine: tell them
apart by SLURMD_NODENAME / SLURM_NODEID, and by $MN_SSH_HOST or the server address in
$SSH_CONNECTION. Needs root and: apt-get install slurmd slurmctld slurm-client munge openssh-server.
Without them the tests that use these fixtures are skipped, except under CI=true/1, where they fail.
"""

from __future__ import annotations

import os
import random
import shutil
import socket
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest

INFRA = Path(__file__).resolve().parent / "infra"
SLURM_TOOLS = ("munged", "mungekey", "munge", "unmunge", "slurmctld", "slurmd", "sinfo", "srun", "sbatch",
               "squeue", "scancel", "scontrol")
SSH_TOOLS = ("sshd", "ssh", "ssh-keygen")
APT = "apt-get install -y slurmd slurmctld slurm-client munge openssh-server"
SSH_ADDRS = ("127.0.0.2", "127.0.0.3")
_SBIN = os.pathsep.join(("/usr/local/sbin", "/usr/sbin", "/sbin"))


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("true", "1")


def _which(tool: str) -> str | None:
    return shutil.which(tool) or shutil.which(tool, path=_SBIN)


def require(*tools: str, root: bool = True) -> None:
    """Skip the calling test (or fixture) when a tool is missing or we are not root; under CI, fail."""
    problems = []
    missing = [t for t in tools if _which(t) is None]
    if missing:
        problems.append(f"missing {', '.join(missing)} (install: {APT})")
    if root and os.geteuid() != 0:
        problems.append("needs root (starts munged/slurmd/sshd)")
    if not problems:
        return
    msg = "multi-node test infrastructure unavailable: " + "; ".join(problems)
    if in_ci():
        pytest.fail(msg + " [CI must not skip these]", pytrace=False)
    pytest.skip(msg)


def _logs_tail(d: Path, pattern: str, n: int = 25) -> str:
    out = []
    for f in sorted(d.glob(pattern)):
        try:
            lines = f.read_text(errors="replace").splitlines()[-n:]
        except OSError:
            continue
        out.append(f"--- {f}\n" + "\n".join(lines))
    return "\n".join(out)


def _run_script(script: str, *args: str, logs: tuple[Path, str], timeout: float = 120, env=None) -> str:
    try:
        r = subprocess.run(["bash", str(INFRA / script), *args], capture_output=True, text=True, timeout=timeout,
                           env={**os.environ, **(env or {})})
    except subprocess.TimeoutExpired as e:
        raise RuntimeError(f"{script} {' '.join(args)} timed out after {timeout}s\n"
                           f"{e.stderr or ''}\n{_logs_tail(*logs)}") from None
    if r.returncode != 0:
        raise RuntimeError(f"{script} {' '.join(args)} failed (rc {r.returncode}):\n"
                           f"{r.stdout}{r.stderr}\n{_logs_tail(*logs)}")
    return r.stdout


# ---------------------------------------------------------------------------------------------- SLURM
@dataclass
class SlurmCluster:
    dir: Path                      # run dir: slurm.conf, gres.conf, log/, munge/, state/, spool/
    env: dict[str, str]            # SLURM_CONF and PATH (tests/infra/bin first: the sacct stand-in)
    partition: str = "debug"
    nodes: list[str] = field(default_factory=lambda: ["node1", "node2"])

    @property
    def conf(self) -> Path:
        return self.dir / "slurm.conf"

    def environ(self, **extra: str) -> dict[str, str]:
        """os.environ plus this cluster's env (plus ``extra``): for subprocess ``env=``."""
        return {**os.environ, **self.env, **extra}

    def apply(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Point in-process clients (submitit) at this cluster for one test."""
        for k, v in self.env.items():
            monkeypatch.setenv(k, v)

    def run(self, *cmd: str, check: bool = True, timeout: float = 60) -> str:
        """Run a SLURM client (sbatch, srun, scontrol, ...) against this cluster; returns stdout."""
        r = subprocess.run(cmd, env=self.environ(), capture_output=True, text=True, timeout=timeout)
        if check and r.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed (rc {r.returncode}):\n{r.stdout}{r.stderr}\n{self.logs()}")
        return r.stdout

    def logs(self, n: int = 25) -> str:
        return _logs_tail(self.dir / "log", "*.log", n)


def _bindable(port: int, addr: str = "") -> bool:
    try:
        with socket.socket() as s:
            s.bind((addr, port))
        return True
    except OSError:
        return False


def _slurm_ports() -> dict[str, str]:
    """Free ports for slurmctld (C) and the two slurmd (C+1, C+2: node ports must be consecutive)."""
    for _ in range(200):
        c = random.randrange(20000, 32000)  # below the usual ephemeral range
        if all(_bindable(p) for p in (c, c + 1, c + 2)):
            return {"MN_CTLD_PORT": str(c), "MN_NODE_PORT": str(c + 1)}
    raise RuntimeError("no free ports for the SLURM test cluster")


def start_slurm(run_dir: str | None = None) -> SlurmCluster:
    """Start a cluster (tests/infra/start-slurm.sh) in a short /tmp dir; raise with the logs if it fails."""
    d = Path(run_dir or tempfile.mkdtemp(prefix="/tmp/ftlslurm."))  # short: unix sockets live here
    try:
        _run_script("start-slurm.sh", str(d), logs=(d / "log", "*.log"), env=_slurm_ports())
    except BaseException:
        stop_slurm(d)
        raise
    path = os.pathsep.join([str(INFRA / "bin"), os.environ.get("PATH", os.defpath)])
    return SlurmCluster(dir=d, env={"SLURM_CONF": str(d / "slurm.conf"), "PATH": path})


def stop_slurm(cluster: SlurmCluster | Path | str, rm: bool = True) -> None:
    d = cluster.dir if isinstance(cluster, SlurmCluster) else Path(cluster)
    subprocess.run(["bash", str(INFRA / "stop-slurm.sh"), str(d), *(["--rm"] if rm else [])],
                   capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="session")
def slurm_cluster():
    require(*SLURM_TOOLS)
    cluster = start_slurm()
    try:
        yield cluster
    finally:
        stop_slurm(cluster)


# ------------------------------------------------------------------------------------------------ SSH
@dataclass
class SshHosts:
    dir: Path                      # run dir: keys, sshd_hostN.conf/.log, sshd-hostN.pid, known_hosts
    key: Path                      # client private key (root may log in with it on every host)
    hosts: list[dict]              # [{"host": "127.0.0.2", "port": P, "user": "root", "key": KEY, "name": "host1"}, ...]
    ssh_config: Path               # aliases host1, host2: `ssh -F ssh_config host1 cmd`

    @property
    def known_hosts(self) -> Path:
        return self.dir / "known_hosts"

    def ssh_args(self, i: int) -> list[str]:
        """argv prefix to run a command on host i (0-based): ``ssh_args(0) + ["echo", "ok"]``."""
        h = self.hosts[i]
        return ["ssh", "-i", str(self.key), "-p", str(h["port"]), "-o", "BatchMode=yes",
                "-o", "StrictHostKeyChecking=no", "-o", f"UserKnownHostsFile={self.known_hosts}",
                "-o", "LogLevel=ERROR", f"{h['user']}@{h['host']}"]

    def pids(self) -> list[int]:
        return [int((self.dir / f"sshd-{h['name']}.pid").read_text()) for h in self.hosts]


def _free_port(addrs=SSH_ADDRS) -> int:
    """A TCP port free on every address in ``addrs`` (loopback only)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind((addrs[0], 0))
            port = s.getsockname()[1]
        try:
            for a in addrs:
                with socket.socket() as s:
                    s.bind((a, port))
            return port
        except OSError:
            continue
    raise RuntimeError(f"no common free port on {addrs}")


def start_sshd(run_dir: str | None = None, addrs=SSH_ADDRS) -> SshHosts:
    d = Path(run_dir or tempfile.mkdtemp(prefix="/tmp/ftlssh."))
    port = _free_port(addrs)
    try:
        _run_script("start-sshd.sh", str(d), *(f"{a}:{port}" for a in addrs), logs=(d, "sshd_*.log"))
    except BaseException:
        stop_sshd(d)
        raise
    key = d / "id_ed25519"
    hosts = [{"host": a, "port": port, "user": "root", "key": str(key), "name": f"host{i + 1}"}
             for i, a in enumerate(addrs)]
    return SshHosts(dir=d, key=key, hosts=hosts, ssh_config=d / "ssh_config")


def stop_sshd(hosts: SshHosts | Path | str, rm: bool = True) -> None:
    d = hosts.dir if isinstance(hosts, SshHosts) else Path(hosts)
    subprocess.run(["bash", str(INFRA / "stop-sshd.sh"), str(d), *(["--rm"] if rm else [])],
                   capture_output=True, text=True, timeout=60)


@pytest.fixture(scope="session")
def ssh_hosts():
    require(*SSH_TOOLS)
    hosts = start_sshd()
    try:
        yield hosts
    finally:
        stop_sshd(hosts)
