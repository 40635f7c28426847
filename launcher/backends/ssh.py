"""The SSH backend: N plain hosts, one `python -m launcher.agent` per host started over SSH.

* Each node process is started with setsid + nohup, detached from the SSH session: a dropped connection
  does not stop training, and ftl (or a later `ftl logs -f`, `ftl status`, `ftl cancel`) reconnects.
* Node 0's address (`hosts[0].address`, else its `host`) and a port free on it form the static
  rendezvous; launcher.agent.node's pre-flight checks every node against it before training starts.
* Logs come back over SSH (`tail -F` of each node's log) into logs/launch.log, prefixed by node; a
  dropped connection is re-opened from the first unseen line, and a node unreachable for
  FTL_UNREACHABLE_S (600 s) counts as failed.
* When one node fails, the others are stopped (SIGTERM: they save a checkpoint; SIGKILL after a grace
  period) so no process is left behind; Ctrl-C and `ftl cancel` stop every node the same way.
* Secret env (HF_TOKEN...) is handed to each node on SSH's stdin, never on a command line or on disk.

The run directory must be at the same path on every host (a shared filesystem, or one the rented-GPU
backend syncs). Host keys are remembered per run (accept-new, see known_hosts_file).
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from launcher.agent.node import SECRETS_VAR, preflight_errors
from launcher.backends.base import Backend, say
from launcher.core.errors import FtlError
from launcher.core.files import utcnow
from launcher.core.procs import EXIT_INTERRUPTED, kill_tree, pid_alive, signal_words, trap_signals
from launcher.render import AGENT_MODULE, LaunchSpec
from launcher.rundir import ACTIVE, Run
from launcher.rundir.cost import write_cost
from launcher.spec.recipe import Recipe, recipe_from_dict

POLL_S = 1.0
TAIL_DRAIN_S = 10.0  # after the nodes end, how long their log streams may take to deliver the last lines
SSH_TIMEOUT_S = 30


def stop_grace_s() -> float:
    """How long stopped nodes get to save a checkpoint before SIGKILL."""
    return float(os.environ.get("FTL_STOP_GRACE_S", "90"))


def unreachable_limit_s() -> float:
    """How long a node may stay unreachable over SSH (its training goes on) before the run counts it failed."""
    return float(os.environ.get("FTL_UNREACHABLE_S", "600"))


class SshError(FtlError):
    pass


@dataclass
class Node:
    """One host of the run, as recorded in state.json."""

    rank: int
    host: str
    port: int = 22
    user: str | None = None
    key: str | None = None
    address: str | None = None
    python: str | None = None
    pid: int | None = None

    @property
    def label(self) -> str:
        return f"node {self.rank} ({self.host}{'' if self.port == 22 else f':{self.port}'})"

    def to_json(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("rank", "host", "port", "user", "key", "address", "python", "pid")}


def known_hosts_file(run_dir: Path) -> Path:
    """The run's own known_hosts (accept-new: rented instances are new hosts, and their addresses get reused
    by other instances later). Outside the run directory because ssh's option parser cannot take a path
    with quotes in it, and run directories may have any name."""
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ftl" / "ssh"
    base.mkdir(parents=True, exist_ok=True)
    return base / f"known_hosts-{hashlib.sha1(str(run_dir).encode()).hexdigest()[:16]}"


def ssh_argv(node: Node, run_dir: Path, command: str, tty: bool = False) -> list[str]:
    """ssh to a node: batch mode, per-run known_hosts (accept-new), a shared control connection."""
    argv = ["ssh", "-p", str(node.port), "-o", "BatchMode=yes", "-o", "ConnectTimeout=10",
            "-o", "ServerAliveInterval=10", "-o", "ServerAliveCountMax=3",
            "-o", "StrictHostKeyChecking=accept-new", "-o", f"UserKnownHostsFile={known_hosts_file(run_dir)}",
            "-o", "ControlMaster=auto", "-o", "ControlPath=/tmp/ftl-ssh-%C", "-o", "ControlPersist=60",
            "-o", "LogLevel=ERROR"]
    if node.key:
        argv += ["-i", str(Path(node.key).expanduser()), "-o", "IdentitiesOnly=yes"]
    argv += ["-tt"] if tty else ["-T"]
    argv += [f"{node.user}@{node.host}" if node.user else node.host, command]
    return argv


def run_ssh(node: Node, run_dir: Path, command: str, stdin: str | None = None,
            timeout: float = SSH_TIMEOUT_S) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(ssh_argv(node, run_dir, command), input=stdin, capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        return subprocess.CompletedProcess([], 255, "", f"ssh to {node.host} timed out after {timeout:.0f} s")


def remote_dir(run: Run) -> Path:
    """The run directory as the hosts see it: the same path (shared filesystem), or where a backend that
    syncs it (rented GPUs) put it, recorded as state.json's `remote_run_dir`."""
    d = run.state().get("remote_run_dir")
    return Path(d) if d else run.dir


def nodes_of(recipe: Recipe) -> list[Node]:
    cl = recipe.cluster
    return [Node(rank=i, host=h.host, port=h.port, user=h.user, key=h.key, address=h.address,
                 python=h.python or cl.python) for i, h in enumerate(cl.hosts[: cl.nodes])]


def _remote_python(node: Node) -> str:
    return node.python or sys.executable


def dry_run_lines(run: Run, recipe: Recipe) -> str:
    """What ftl would run on each host (the rendezvous port is chosen on node 0 at launch)."""
    nodes = nodes_of(recipe)
    main = nodes[0].address or nodes[0].host
    out = []
    for n in nodes:
        cmd = [_remote_python(n), "-m", AGENT_MODULE, "--run-dir", str(run.dir), "--machine-rank", str(n.rank),
               "--nodes", str(len(nodes)), "--main-addr", main, "--port", "<free port on node 0>", "--name", n.host]
        target = f"{n.user}@{n.host}" if n.user else n.host
        out.append(f"# {n.label}: ssh -p {n.port} {target}, detached (setsid nohup)\n" + " ".join(shlex.quote(a) for a in cmd))
    return "\n".join(out)


@dataclass
class SshHandle:
    run: Run
    nodes: list[Node]
    stop_signal: int | None = None
    killed: bool = False
    tails: list["LogFollower"] = field(default_factory=list)


class SshBackend(Backend):
    """Plain hosts over SSH. `on_nodes_ended` runs after every node has ended and before the verdict (which reads
    result.json, preflight/ and checkpoints locally): a backend whose hosts do not share the run directory
    brings the results back there (the rental backend)."""

    name = "ssh"

    def __init__(self, echo: bool = True, on_nodes_ended: Callable[["SshHandle"], None] | None = None):
        self.echo = echo
        self.on_nodes_ended = on_nodes_ended
        self.out_lock = threading.Lock()

    def check(self) -> None:
        if not shutil.which("ssh"):
            raise SshError("the ssh client is not on PATH: install OpenSSH (apt-get install openssh-client)")

    # -- start --------------------------------------------------------------------------------
    def launch(self, run: Run, resume_from: str | None = None, spec: LaunchSpec | None = None,
               secrets: dict[str, str] | None = None, nodes: list[Node] | None = None) -> SshHandle:
        """Start one node agent per host: the profile's hosts, or `nodes` (hosts that exist only for this run)."""
        recipe = recipe_from_dict(run.recipe_dict(), run.recipe_path)
        nodes = nodes if nodes is not None else nodes_of(recipe)
        rdir = remote_dir(run)
        for n in nodes:  # reachable, and the run directory is there (shared or synced)
            r = run_ssh(n, run.dir, f"test -f {shlex.quote(str(rdir / 'plan.json'))} && echo ok")
            if r.returncode != 0 or "ok" not in r.stdout:
                why = r.stderr.strip().splitlines()[-1] if r.stderr.strip() else f"{rdir / 'plan.json'} is not there"
                run.update_state(status="failed", ended=utcnow(), error=f"{n.label}: {why}")
                raise SshError(f"{n.label}: cannot start the run there: {why}. The run directory must be at the same "
                               "path on every host (a shared filesystem)")
        main_addr = nodes[0].address or nodes[0].host
        port = self._free_port(nodes[0], run.dir)
        workdir = recipe.cluster.workdir or (run.state().get("cwd") if rdir == run.dir else None) or str(rdir)
        run.update_state(status="running", started=run.state().get("started") or utcnow(), ended=None, returncode=None,
                         error=None, main={"addr": main_addr, "port": port}, hosts=[n.to_json() for n in nodes])
        secret_line = json.dumps(secrets or {})
        handle = SshHandle(run, nodes)
        try:
            for n in nodes:
                n.pid = self._start_node(run, n, len(nodes), main_addr, port, workdir, secret_line)
                run.update_state(hosts=[m.to_json() for m in nodes])
        except BaseException:
            self.signal_all(handle, signal.SIGKILL)
            raise
        self.say(handle, f"ftl: started {len(nodes)} node(s): " + ", ".join(f"{n.label} pid {n.pid}" for n in nodes)
                  + f"; rendezvous {main_addr}:{port}")
        for n in nodes:
            handle.tails.append(self._tail(handle, n))
        return handle

    def _free_port(self, node: Node, run_dir: Path) -> int:
        code = "import socket; s = socket.socket(); s.bind(('', 0)); print(s.getsockname()[1])"
        r = run_ssh(node, run_dir, f"{shlex.quote(_remote_python(node))} -c {shlex.quote(code)}")
        try:
            return int(r.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            raise SshError(f"{node.label}: could not find a free port ({r.stderr.strip() or r.stdout.strip()})") from None

    def _start_node(self, run: Run, n: Node, nodes: int, main_addr: str, port: int, workdir: str, secret_line: str) -> int:
        logs = remote_dir(run) / "logs"
        node_cmd = [_remote_python(n), "-m", AGENT_MODULE, "--run-dir", str(remote_dir(run)), "--machine-rank", str(n.rank),
                    "--nodes", str(nodes), "--main-addr", main_addr, "--port", str(port), "--name", n.host]
        q = shlex.quote
        # read the secrets line from stdin into the environment, then detach (setsid: own session, so the
        # pid is the process group to signal; nohup + redirections: nothing tied to this SSH session)
        script = (f"IFS= read -r {SECRETS_VAR}; export {SECRETS_VAR}; export FTL_NODE_QUIET=1; "
                  f"mkdir -p {q(str(logs))} && cd {q(workdir)} && rm -f {q(str(logs / f'node-{n.rank}.exit'))} && "
                  f"setsid nohup {' '.join(q(a) for a in node_cmd)} > {q(str(logs / f'node-{n.rank}.out'))} 2>&1 "
                  f"< /dev/null & echo $!")
        r = run_ssh(n, run.dir, f"sh -c {q(script)}", stdin=secret_line + "\n")
        try:
            return int(r.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            raise SshError(f"{n.label}: could not start the node process: {r.stderr.strip() or r.stdout.strip()}") from None

    # -- logs over SSH --------------------------------------------------------------------------
    def _tail(self, h: SshHandle, n: Node) -> "LogFollower":
        f = LogFollower(self, h, n)
        f.start()
        return f

    def _emit(self, h: SshHandle, line: str) -> None:
        with self.out_lock:
            with open(h.run.log_path, "a", errors="replace") as log:
                log.write(line + "\n")
            if self.echo:
                try:
                    sys.stdout.write(line + "\n")
                    sys.stdout.flush()
                except (OSError, ValueError):
                    pass

    # -- wait -----------------------------------------------------------------------------------
    def wait(self, handle: SshHandle) -> str:
        def on_signal(signum, _frame):
            if handle.stop_signal is None:
                handle.stop_signal = signum
                handle.run.update_state(stop_requested=utcnow())
                self.say(handle, f"ftl: {signal_words(signum)}: asking every node of run {handle.run.id} to save "
                                  "a checkpoint and stop (again to kill them now)")
                self.signal_all(handle, signal.SIGTERM)
            else:
                handle.killed = True
                self.say(handle, f"ftl: killing every process of run {handle.run.id}")
                self.signal_all(handle, signal.SIGKILL)

        with trap_signals(on_signal):
            try:
                codes = self._watch(handle)
            finally:
                deadline = time.monotonic() + TAIL_DRAIN_S  # the tails end once they have the last lines
                for t in handle.tails:
                    t.stop(max(0.0, deadline - time.monotonic()))
        if self.on_nodes_ended is not None:
            self.on_nodes_ended(handle)
        status, error, rc = self._verdict(handle.run, codes, handle.stop_signal is not None or handle.killed)
        handle.run.update_state(status=status, ended=utcnow(), error=error, returncode=rc,
                                node_returncodes={str(k): v for k, v in codes.items()})
        self.say(handle, f"===== ftl: run {status} at {utcnow()} =====")
        try:
            write_cost(handle.run)
        except Exception as e:  # noqa: BLE001
            self.say(handle, f"ftl: could not write cost.json: {e}")
        return status

    def _watch(self, h: SshHandle) -> dict[int, int | None]:
        """Poll every node until all have ended; when one fails, stop the others. {rank: exit code or None}."""
        codes: dict[int, int | None] = {}
        stopping_since: float | None = None
        unreachable_since: dict[int, float] = {}
        while len(codes) < len(h.nodes):
            for n in h.nodes:
                if n.rank in codes:
                    continue
                state = self.probe(h.run, n)
                if state == "unreachable":
                    first = unreachable_since.setdefault(n.rank, time.monotonic())
                    if time.monotonic() - first < unreachable_limit_s():
                        continue
                    state = "gone"
                    self.say(h, f"ftl: {n.label} unreachable over SSH for {unreachable_limit_s():.0f} s; giving it up")
                else:
                    unreachable_since.pop(n.rank, None)
                if state == "alive":
                    continue
                codes[n.rank] = None if state == "gone" else int(state)
                failed = codes[n.rank] not in (0, EXIT_INTERRUPTED)
                if failed and stopping_since is None and len(codes) < len(h.nodes):
                    what = "vanished without an exit code" if codes[n.rank] is None else f"exited with {codes[n.rank]}"
                    self.say(h, f"ftl: {n.label} {what}; stopping the other nodes")
                    h.run.update_state(error=f"{n.label} {what}")
                    self.signal_all(h, signal.SIGTERM, skip=set(codes))
                    stopping_since = time.monotonic()
            if h.stop_signal is not None and stopping_since is None:
                stopping_since = time.monotonic()
            if stopping_since is not None and time.monotonic() - stopping_since > stop_grace_s() and not h.killed:
                self.say(h, f"ftl: nodes still running {stop_grace_s():.0f} s after the stop; killing them")
                h.killed = True
                self.signal_all(h, signal.SIGKILL, skip=set(codes))
            if len(codes) < len(h.nodes):
                time.sleep(POLL_S)
        return codes

    def probe(self, run: Run, n: Node) -> str:
        """'alive', an exit code as text, 'gone' (no process, no exit code) or 'unreachable'."""
        q = shlex.quote
        exit_file = str(remote_dir(run) / "logs" / f"node-{n.rank}.exit")
        cmd = (f"if [ -f {q(exit_file)} ]; then cat {q(exit_file)}; elif kill -0 {int(n.pid or 0)} 2>/dev/null; "
               f"then echo alive; else sleep 1; [ -f {q(exit_file)} ] && cat {q(exit_file)} || echo gone; fi")
        r = run_ssh(n, run.dir, cmd, timeout=20)
        out = r.stdout.strip().splitlines()
        if r.returncode != 0 and not out:
            return "unreachable"
        return out[-1].strip() if out else "unreachable"

    def signal_all(self, h: SshHandle, sig: int, skip: set[int] | None = None) -> None:
        for n in h.nodes:
            if n.pid and n.rank not in (skip or set()):
                self._signal_node(h.run, n, sig)

    @staticmethod
    def _signal_node(run: Run, n: Node, sig: int) -> None:
        """SIGTERM to the node process (it stops its trainer, which saves); SIGKILL to its session and the
        training processes' session."""
        pid = int(n.pid or 0)
        if sig == signal.SIGKILL:
            pids_file = shlex.quote(str(remote_dir(run) / "logs" / f"node-{n.rank}.pids"))
            cmd = (f"for s in {pid} $(cat {pids_file} 2>/dev/null); do pkill -KILL -s $s 2>/dev/null; done; "
                   f"kill -KILL {pid} 2>/dev/null; true")
        else:
            cmd = f"kill -{int(sig)} {pid} 2>/dev/null; true"
        run_ssh(n, run.dir, cmd, timeout=20)

    @staticmethod
    def _verdict(run: Run, codes: dict[int, int | None], stop_requested: bool) -> tuple[str, str | None, int | None]:
        res = run.result() or {}
        worst = next((c for c in codes.values() if c not in (0, EXIT_INTERRUPTED)), 0)
        pre = preflight_errors(run)
        if pre:
            return "failed", "pre-flight failed: " + "; ".join(pre), worst
        if all(c == 0 for c in codes.values()) and res.get("status") == "completed":
            return "completed", None, 0
        if all(c in (0, EXIT_INTERRUPTED) for c in codes.values()) and (res.get("status") == "interrupted" or stop_requested):
            return "stopped", None, EXIT_INTERRUPTED
        if stop_requested and res.get("status") != "completed":
            return "stopped", None, worst
        failed = [f"node {k} " + ("vanished" if c is None else f"exited with {c}") for k, c in sorted(codes.items())
                  if c not in (0, EXIT_INTERRUPTED)]
        return "failed", (run.state().get("error") or "; ".join(failed) or "the run ended without a result"), worst if worst is not None else 1

    # -- other verbs ------------------------------------------------------------------------------
    def recorded_nodes(self, run: Run) -> list[Node]:
        """The hosts the run started on (state.json `hosts`)."""
        return [Node(**{k: v for k, v in h.items() if k in Node.__dataclass_fields__}) for h in run.state().get("hosts") or []]

    def status(self, run: Run) -> dict[str, Any]:
        st = run.state()
        if st.get("status") not in ACTIVE or pid_alive(st.get("launcher_pid")):
            return st
        nodes = self.recorded_nodes(run)
        if not nodes:
            return st
        states = {n.rank: self.probe(run, n) for n in nodes}
        if any(s in ("alive", "unreachable") for s in states.values()):
            return st
        codes = {k: (None if s == "gone" else int(s)) for k, s in states.items()}
        status, error, rc = self._verdict(run, codes, bool(st.get("stop_requested")))
        return run.update_state(status=status, ended=st.get("ended") or utcnow(), error=error, returncode=rc,
                                node_returncodes={str(k): v for k, v in codes.items()})

    def cancel(self, run: Run) -> bool:
        st = self.status(run)
        if st.get("status") not in ACTIVE:
            return False
        run.update_state(stop_requested=utcnow())
        if pid_alive(st.get("launcher_pid")):  # the launching ftl stops every node and records the end
            try:
                os.kill(int(st["launcher_pid"]), signal.SIGTERM)
                return True
            except OSError:
                pass
        h = SshHandle(run, self.recorded_nodes(run))
        self.signal_all(h, signal.SIGTERM)
        return True

    def logs(self, run: Run, follow: bool = False, rank: int | None = None) -> Iterator[str]:
        nodes = self.recorded_nodes(run)
        n = next((m for m in nodes if m.rank == (rank or 0)), None)
        if n is None:
            raise SshError(f"run {run.id} has no node {rank or 0} (nodes: {', '.join(str(m.rank) for m in nodes) or 'none'})")
        path = shlex.quote(str(remote_dir(run) / "logs" / f"node-{n.rank}.log"))
        if not follow:
            r = run_ssh(n, run.dir, f"cat {path}", timeout=120)
            if r.returncode != 0:
                raise SshError(f"{n.label}: cannot read its log: {r.stderr.strip()}")
            yield from r.stdout.splitlines()
            return
        until = f" --pid={int(n.pid)}" if n.pid else ""  # ends with the node (see LogFollower)
        p = subprocess.Popen(ssh_argv(n, run.dir, f"tail -n +1 -F -s 0.5{until} {path} 2>/dev/null"), stdin=subprocess.DEVNULL,
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True)

        def stop_when_done() -> None:
            while p.poll() is None:
                if self.status(run).get("status") not in ACTIVE:
                    time.sleep(1.0)  # the last lines
                    kill_tree(p)
                    return
                time.sleep(2.0)

        threading.Thread(target=stop_when_done, daemon=True).start()
        try:
            assert p.stdout is not None
            for line in p.stdout:
                yield line.rstrip("\n")
        finally:
            kill_tree(p)

    def log_path(self, run: Run, rank: int | None = None) -> Path:
        return run.dir / "logs" / f"node-{rank or 0}.log"

    def where(self, state: dict[str, Any]) -> str:
        return ",".join(str(h.get("host")) for h in state.get("hosts") or [])

    def say(self, h: SshHandle, msg: str) -> None:
        """One line of ftl's own to the terminal and the run's launch.log, between the nodes' lines."""
        say(h.run, msg, self.out_lock)


class LogFollower:
    """Follows one node's log over SSH into logs/launch.log; when the connection drops it reconnects and
    goes on from the first line it has not seen (training on the node does not depend on this stream)."""

    RECONNECT_S = 2.0

    def __init__(self, backend: SshBackend, h: SshHandle, n: Node):
        self.backend, self.h, self.n = backend, h, n
        self.seen = 0
        self.reconnects = 0
        self.stopped = threading.Event()
        self.thread: threading.Thread | None = None
        self.proc: subprocess.Popen | None = None
        self.prefix = f"[node {n.rank}] " if len(h.nodes) > 1 else ""

    def start(self) -> None:
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        path = shlex.quote(str(remote_dir(self.h.run) / "logs" / f"node-{self.n.rank}.log"))
        while not self.stopped.is_set():
            # --pid: the remote tail ends by itself once the node has ended (a tail whose SSH client is gone
            # lives on until it next writes, so it must not depend on being killed from here)
            cmd = f"tail -n +{self.seen + 1} -F -s 0.5 --pid={self.n.pid} {path} 2>/dev/null"
            try:
                self.proc = subprocess.Popen(ssh_argv(self.n, self.h.run.dir, cmd), stdin=subprocess.DEVNULL,
                                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, start_new_session=True)
            except OSError:
                return
            assert self.proc.stdout is not None
            got = False
            for raw in iter(self.proc.stdout.readline, b""):
                if not raw.endswith(b"\n"):  # cut by the drop: read it again whole after reconnecting
                    break
                got = True
                self.seen += 1
                self.backend._emit(self.h, self.prefix + raw.decode("utf-8", "replace").rstrip("\n"))
            if self.proc.wait() == 0:  # tail saw the node end: every line is in
                return
            if self.stopped.wait(self.RECONNECT_S):
                return
            if got or not self.reconnects:  # once per outage
                self.backend.say(self.h, f"ftl: lost the log stream of {self.n.label}; reconnecting "
                                          "(training goes on there)")
            self.reconnects = 0 if got else self.reconnects + 1

    def stop(self, wait_s: float = 0.0) -> None:
        """Stop following: after up to `wait_s` for the stream to end by itself (the node has ended, so its
        remote tail exits after the last line), kill what is left of it."""
        self.stopped.set()
        if self.thread is not None:
            self.thread.join(wait_s)
        if self.proc is not None:
            kill_tree(self.proc)
