"""What runs on each node of a SLURM, SSH or rented launch: `python -m launcher.agent --run-dir RUN_DIR`.

Multi-node launches fail in dull ways: ranks that disagree on the world size, a main address that is
not reachable, a node with fewer GPUs or another torch. So every node first checks itself and meets
the others before any training process starts (pre-flight):

1. Where am I: node rank, node count, the first node's address and a port. Under SLURM they come from
   the job (`SLURM_NODEID`; the first node of `SLURM_JOB_NODELIST` resolved through `scontrol show
   node` to its NodeAddr, never assumed from its name; a port node 0 finds free on its host and writes
   into the run directory, which every node sees). Over SSH, ftl passes them on the command line.
2. Node 0 listens on that address and port; every other node connects (which proves the main address
   is reachable on the chosen port) and sends its facts: GPUs visible, python/torch/transformers/ftl
   versions. Node 0 compares them and answers every node with go or the failure, naming the node and
   the check. A failure is written to `preflight/node-<rank>.json` and the node exits with 3.
3. Node 0 also picks the checkpoint to resume from (the run directory's newest COMPLETE one), so a
   requeued job continues where it stopped and all nodes agree on where that is.
4. The node then starts its `accelerate launch` line (launcher.render.train_spec: machine rank, static
   rendezvous on the same address and port), copies its output to `logs/node-<rank>.log` and stdout,
   forwards stop signals to it as SIGTERM (the trainer saves a checkpoint and stops) and writes its exit
   code to `logs/node-<rank>.exit`.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import launcher
from launcher.core.errors import FtlError
from launcher.core.files import read_json, utcnow, write_json
from launcher.core.procs import EXIT_INTERRUPTED, EXIT_PREFLIGHT, free_port, group_alive, killpg, trap_signals
from launcher.render import Plan, train_spec
from launcher.rundir import Run, find_run
from launcher.spec.packages import missing_packages
from launcher.spec.recipe import recipe_from_dict

SECRETS_VAR = "FTL_NODE_SECRETS"  # JSON of secret env, handed over by the SSH backend; never written
GROUP_EXIT_WAIT_S = 120


def preflight_timeout() -> float:
    return float(os.environ.get("FTL_PREFLIGHT_TIMEOUT", "180"))


@dataclass
class Place:
    """This node's place in the launch."""

    rank: int
    nodes: int
    main_addr: str
    port: int
    name: str

    @property
    def label(self) -> str:
        return f"node {self.name} (rank {self.rank})"


class PreflightError(Exception):
    pass


# ---------------------------------------------------------------------------------------------
# where am I


def slurm_port(run_dir: Path, job_id: str, restart: str, rank: int, timeout: float | None = None) -> int:
    """The rendezvous port of a SLURM job: node 0 takes a free one on its host and writes it into the run
    directory (which every node sees: SLURM launches need a shared filesystem anyway); the others read it.
    One file per job and restart, so a requeued job never reads the port of its previous run."""
    path = run_dir / "preflight" / f"port-{job_id}-{restart}.json"
    if rank == 0:
        path.parent.mkdir(exist_ok=True)
        port = free_port("")
        write_json(path, {"port": port})
        return port
    deadline = time.monotonic() + (preflight_timeout() if timeout is None else timeout)
    while time.monotonic() < deadline:
        try:
            d = read_json(path)
        except Exception:  # noqa: BLE001 - being written; read again
            d = None
        if d and d.get("port"):
            return int(d["port"])
        time.sleep(0.2)
    raise PreflightError(f"node 0 never published the rendezvous port in {path}: is the run directory on a "
                         "filesystem every node sees?")


def slurm_node_addr(node: str) -> str:
    """A node's address as SLURM knows it (NodeAddr), falling back to name resolution."""
    try:
        out = subprocess.run(["scontrol", "show", "node", "-o", node], capture_output=True, text=True,
                             timeout=30).stdout
        for field in out.split():
            if field.startswith("NodeAddr="):
                return field.split("=", 1)[1]
    except (OSError, subprocess.SubprocessError):
        pass
    return socket.gethostbyname(node)


def slurm_place(run_dir: Path) -> Place:
    env = os.environ
    missing = [k for k in ("SLURM_JOB_ID", "SLURM_NODEID", "SLURM_JOB_NODELIST") if k not in env]
    if missing:
        raise PreflightError(f"not inside a SLURM job step ({', '.join(missing)} unset); run this through srun, "
                             "or give --machine-rank/--main-addr/--port")
    hosts = subprocess.run(["scontrol", "show", "hostnames", env["SLURM_JOB_NODELIST"]], capture_output=True,
                           text=True, timeout=30).stdout.split()
    if not hosts:
        raise PreflightError(f"scontrol could not expand SLURM_JOB_NODELIST={env['SLURM_JOB_NODELIST']!r}")
    nodes = int(env.get("SLURM_JOB_NUM_NODES") or env.get("SLURM_NNODES") or len(hosts))
    rank = int(env["SLURM_NODEID"])
    return Place(rank=rank, nodes=nodes, main_addr=slurm_node_addr(hosts[0]),
                 port=slurm_port(run_dir, env["SLURM_JOB_ID"], env.get("SLURM_RESTART_COUNT") or "0", rank),
                 name=env.get("SLURMD_NODENAME") or socket.gethostname())


# ---------------------------------------------------------------------------------------------
# pre-flight


def node_facts(place: Place) -> dict[str, Any]:
    import torch  # the torch boundary: only a node that is about to train pays for it
    import transformers

    return {"rank": place.rank, "node": place.name, "python": sys.version.split()[0], "torch": torch.__version__,
            "transformers": transformers.__version__, "ftl": launcher.__version__,
            "gpus": torch.cuda.device_count() if torch.cuda.is_available() else 0,
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}


def own_problems(plan: Any, facts: dict[str, Any]) -> list[str]:
    """What this node lacks for the plan, judged alone."""
    problems = []
    if plan.device == "cuda" and facts["gpus"] < plan.gpus_per_node:
        seen = facts["cuda_visible_devices"]
        problems.append(f"the plan needs {plan.gpus_per_node} GPU(s) per node, torch sees {facts['gpus']}"
                        + (f" (CUDA_VISIBLE_DEVICES={seen})" if seen is not None else "")
                        + "; fix gpus_per_node in the cluster profile or the node's GPU allocation")
    return problems


VERSION_KEYS = ("ftl", "torch", "transformers", "python")


def compare(all_facts: list[dict[str, Any]]) -> list[str]:
    """Disagreements between nodes, each naming the node, the check and both values."""
    ref = min(all_facts, key=lambda f: f["rank"])
    out = []
    for f in sorted(all_facts, key=lambda f: f["rank"]):
        for p in f.get("problems") or []:
            out.append(f"node {f['node']} (rank {f['rank']}): {p}")
        for k in VERSION_KEYS:
            if f is not ref and f[k] != ref[k]:
                out.append(f"node {f['node']} (rank {f['rank']}): {k} {f[k]}, but {ref[k]} on node {ref['node']} "
                           f"(rank {ref['rank']}); install the same versions on every node")
    return out


def _send(sock: socket.socket, obj: dict[str, Any]) -> None:
    sock.sendall(json.dumps(obj).encode() + b"\n")


def _recv(sock: socket.socket) -> dict[str, Any]:
    buf = b""
    while not buf.endswith(b"\n"):
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("the other side closed the connection")
        buf += chunk
    return json.loads(buf)


def meet(place: Place, facts: dict[str, Any], decide: Callable[[list[dict[str, Any]]], dict[str, Any]],
         timeout: float | None = None) -> dict[str, Any]:
    """Node 0 gathers every node's facts on (main_addr, port) and answers each with decide(facts);
    the others connect (retrying until timeout) and get that answer."""
    timeout = preflight_timeout() if timeout is None else timeout
    deadline = time.monotonic() + timeout
    if place.rank == 0:
        srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            srv.bind(("", place.port))
        except OSError as e:
            raise PreflightError(f"{place.label}: cannot listen on port {place.port} for the rendezvous: {e}") from None
        srv.listen(place.nodes)
        conns: dict[int, socket.socket] = {}
        gathered = [facts]
        try:
            while len(conns) < place.nodes - 1:
                left = deadline - time.monotonic()
                if left <= 0:
                    absent = sorted(set(range(1, place.nodes)) - set(conns))
                    raise PreflightError(f"{place.label}: node rank(s) {absent} did not reach {place.main_addr}:{place.port} "
                                         f"within {timeout:.0f} s; check that every node can reach the main address "
                                         "(firewall, NCCL_SOCKET_IFNAME/GLOO_SOCKET_IFNAME in the profile's env)")
                srv.settimeout(min(left, 5.0))
                try:
                    c, _ = srv.accept()
                except socket.timeout:
                    continue
                c.settimeout(30)
                f = _recv(c)
                conns[int(f["rank"])] = c
                gathered.append(f)
            answer = decide(gathered)
            for c in conns.values():
                try:
                    _send(c, answer)
                except OSError:
                    pass
            return answer
        finally:
            for c in conns.values():
                c.close()
            srv.close()
    last = None
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((place.main_addr, place.port), timeout=5) as c:
                _send(c, facts)
                c.settimeout(max(5.0, deadline - time.monotonic() + 30))
                return _recv(c)
        except (OSError, ConnectionError, json.JSONDecodeError) as e:
            last = e
            time.sleep(0.5)
    raise PreflightError(f"{place.label}: cannot reach the main node at {place.main_addr}:{place.port} within "
                         f"{timeout:.0f} s ({last}); check the address, the port and the profile's "
                         "NCCL_SOCKET_IFNAME/GLOO_SOCKET_IFNAME")


def package_problems(run: Run) -> list[str]:
    """The optional packages the run's recipe needs and this node lacks (the launching machine cannot see them);
    a recipe that cannot be read is a problem too, reported like the others rather than raised."""
    try:
        return missing_packages(recipe_from_dict(run.recipe_dict(), run.recipe_path))
    except FtlError as e:
        return [f"cannot read the run's recipe: {e}"]


def preflight(run: Run, plan: Any, place: Place) -> dict[str, Any]:
    """Check this node and meet the others; returns node 0's answer {ok, error, resume_from}."""
    facts = node_facts(place)
    facts["problems"] = own_problems(plan, facts) + package_problems(run)

    def decide(gathered: list[dict[str, Any]]) -> dict[str, Any]:
        problems = compare(gathered)
        ckpt = run.newest_checkpoint()
        return {"ok": not problems, "error": "; ".join(problems) or None,
                "resume_from": str(ckpt) if ckpt else None, "nodes": sorted(gathered, key=lambda f: f["rank"])}

    if place.nodes == 1:
        return decide([facts])
    return meet(place, facts, decide)


def record_preflight(run: Run, place: Place, answer: dict[str, Any]) -> None:
    d = run.dir / "preflight"
    d.mkdir(exist_ok=True)
    write_json(d / f"node-{place.rank}.json", {"place": asdict(place), **answer})


def preflight_errors(run: Run) -> list[str]:
    """The pre-flight failures the nodes of a run recorded (for the backends' messages)."""
    errors = []
    for f in sorted((run.dir / "preflight").glob("node-*.json")):
        try:
            d = read_json(f) or {}
        except Exception:  # noqa: BLE001 - a torn file says nothing
            continue
        if not d.get("ok") and d.get("error") and d["error"] not in errors:
            errors.append(d["error"])
    return errors


# ---------------------------------------------------------------------------------------------
# the node's training processes


class NodeProcess:
    """This node's `accelerate launch`, in its own process group, its output copied to the node log."""

    def __init__(self, run: Any, place: Place, resume_from: str | None, secrets: dict[str, str]):
        self.run, self.place = run, place
        recipe = recipe_from_dict(run.recipe_dict(), run.recipe_path)
        plan = Plan.from_json(run.plan())
        cwd = run.state().get("cwd")
        self.spec, recorded_secrets = train_spec(recipe, plan, run.dir, port=place.port, resume_from=resume_from,
                                                 cwd=cwd if cwd and os.path.isdir(cwd) else str(run.dir),
                                                 machine_rank=place.rank, main_addr=place.main_addr)
        self.secrets = {**recorded_secrets, **secrets}
        self.proc: subprocess.Popen | None = None
        self.done = threading.Event()
        self.returncode: int | None = None
        self.stop_sent = False

    def start(self, log: Any) -> None:
        log.write(f"$ {self.spec.shell()}\n")
        log.flush()
        env = {**self.spec.child_env(secrets=self.secrets), "FTL_NODE_NAME": self.place.name}
        self.proc = subprocess.Popen(self.spec.argv, env=env, cwd=self.spec.cwd,
                                     stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     start_new_session=True, preexec_fn=_ignore_user_signals)
        # the sessions to kill if this node must be stopped hard (its own, and the training processes')
        (self.run.dir / "logs" / f"node-{self.place.rank}.pids").write_text(f"{os.getpid()} {self.proc.pid}\n")
        threading.Thread(target=self._pump, args=(log,), daemon=True).start()

    def _pump(self, log: Any) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        echo = not os.environ.get("FTL_NODE_QUIET")  # over SSH stdout is a file beside the log: no copy
        for raw in iter(self.proc.stdout.readline, b""):
            line = raw.decode("utf-8", "replace")
            log.write(line)
            log.flush()
            if echo:
                try:
                    sys.stdout.write(line)
                    sys.stdout.flush()
                except (OSError, ValueError):
                    pass
        rc = self.proc.wait()
        deadline = time.monotonic() + GROUP_EXIT_WAIT_S
        while group_alive(self.proc.pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        if group_alive(self.proc.pid):
            killpg(self.proc.pid, signal.SIGKILL)
        self.returncode = rc
        self.done.set()

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Ask the trainer to save a checkpoint and stop (SIGTERM); SIGKILL kills the group now."""
        if self.proc is not None:
            self.stop_sent = True
            killpg(self.proc.pid, sig)

    def wait(self, timeout: float | None = None) -> int | None:
        self.done.wait(timeout)
        return self.returncode


def _ignore_user_signals() -> None:
    # SLURM signals every process of a step (USR1/USR2 before a time limit or on preemption): the
    # trainer handles them (checkpoint and stop), but accelerate's launcher and torchrun would die of
    # them and leave the ranks orphaned. Ignored here, inherited through exec; the trainer re-installs.
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)


def take_secrets() -> dict[str, str]:
    """Secret env handed over in FTL_NODE_SECRETS (SSH backend), removed from this process's env."""
    raw = os.environ.pop(SECRETS_VAR, None)
    if not raw:
        return {}
    try:
        d = json.loads(raw)
    except json.JSONDecodeError:
        return {}
    return {str(k): str(v) for k, v in d.items()} if isinstance(d, dict) else {}


class Node:
    """One node's whole life: pre-flight, training, exit code. `stop()` may come from a signal handler."""

    def __init__(self, run_dir: str | Path, place: Place | None = None):
        self.run = find_run(Path(run_dir))
        self.place = place
        self.proc: NodeProcess | None = None
        self.stopping = False

    def log_path(self, rank: int) -> Path:
        return self.run.dir / "logs" / f"node-{rank}.log"

    def say(self, log: Any, msg: str) -> None:
        line = f"[ftl node] {msg}\n"
        for stream in (log, sys.stderr):
            try:
                stream.write(line)
                stream.flush()
            except (OSError, ValueError):
                pass

    def run_node(self) -> int:
        place = self.place or slurm_place(self.run.dir)
        self.place = place
        (self.run.dir / "logs").mkdir(exist_ok=True)
        rc: int
        with open(self.log_path(place.rank), "a", buffering=1) as log:
            restart = os.environ.get("SLURM_RESTART_COUNT")
            self.say(log, f"{place.label} of {place.nodes}; main {place.main_addr}:{place.port}"
                          + (f"; SLURM restart {restart}" if restart else ""))
            plan = Plan.from_json(self.run.plan())
            job_id = os.environ.get("SLURM_JOB_ID")
            if job_id and place.rank == 0:  # also makes a hand-submitted export visible to ftl status/cancel
                st = self.run.state()
                self.run.update_state(status="running", started=st.get("started") or utcnow(), ended=None,
                                      slurm={**(st.get("slurm") or {}), "job_id": job_id})
            try:
                answer = preflight(self.run, plan, place)
            except PreflightError as e:
                answer = {"ok": False, "error": str(e), "resume_from": None}
            record_preflight(self.run, place, answer)
            if not answer["ok"]:
                self.say(log, f"pre-flight failed: {answer['error']}")
                rc = EXIT_PREFLIGHT
            elif self.stopping:
                rc = EXIT_INTERRUPTED
            else:
                if answer.get("resume_from"):
                    self.say(log, f"resuming from {answer['resume_from']}")
                self.proc = NodeProcess(self.run, place, answer.get("resume_from"), take_secrets())
                self.proc.start(log)
                while not self.proc.done.wait(0.5):  # short waits keep signal handlers responsive
                    pass
                rc = self.proc.returncode if self.proc.returncode is not None else 1
                self.say(log, f"training processes exited with {rc}")
        (self.run.dir / "logs" / f"node-{place.rank}.exit").write_text(f"{rc}\n")
        return rc

    def stop(self, grace_s: float = GROUP_EXIT_WAIT_S, wait: bool = False) -> None:
        """Stop training on this node (the trainer checkpoints); with wait, block until it has ended."""
        self.stopping = True
        if self.proc is None:
            return
        self.proc.stop(signal.SIGTERM)
        if wait and self.proc.wait(grace_s) is None:
            self.proc.stop(signal.SIGKILL)
            self.proc.wait(30)


class SlurmNodeTask:
    """The callable submitit runs on every node (one task per node): a `Node`, plus submitit's
    checkpoint protocol. On the signal SLURM sends before the time limit or on preemption, submitit
    calls `checkpoint()` on the first task: it stops the trainer (which saves a checkpoint) and returns
    a fresh task, which submitit requeues; the requeued job's pre-flight resumes from that checkpoint."""

    def __init__(self, run_dir: str):
        self.run_dir = str(run_dir)
        self._node: Node | None = None

    def __call__(self) -> dict[str, Any]:
        self._node = Node(self.run_dir)
        rc = self._node.run_node()
        place = self._node.place
        if rc not in (0, EXIT_INTERRUPTED):
            errors = preflight_errors(self._node.run) if rc == EXIT_PREFLIGHT else []
            raise RuntimeError(errors[0] if errors else f"{place.label if place else 'node'}: training exited with {rc}; "
                               f"see {self._node.run.dir}/logs/node-{place.rank if place else 0}.log")
        return {"rank": place.rank if place else None, "returncode": rc}

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        import submitit

        if self._node is not None:
            self._node.stop(wait=True)
        return submitit.helpers.DelayedSubmission(SlurmNodeTask(self.run_dir))

    def __getstate__(self) -> dict[str, Any]:
        return {"run_dir": self.run_dir}

    def __setstate__(self, d: dict[str, Any]) -> None:
        self.run_dir, self._node = d["run_dir"], None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m launcher.agent", description=__doc__.split("\n\n")[0])
    ap.add_argument("--run-dir", required=True)
    ap.add_argument("--machine-rank", type=int, help="this node's rank (default: SLURM_NODEID)")
    ap.add_argument("--nodes", type=int, help="node count (default: from the job)")
    ap.add_argument("--main-addr", help="the first node's address (default: resolved through SLURM)")
    ap.add_argument("--port", type=int, help="rendezvous port (default: node 0 picks a free one under SLURM)")
    ap.add_argument("--name", help="this node's name in messages")
    a = ap.parse_args(argv)
    place = None
    if a.machine_rank is not None:
        if a.nodes is None or a.main_addr is None or a.port is None:
            ap.error("--machine-rank needs --nodes, --main-addr and --port")
        place = Place(a.machine_rank, a.nodes, a.main_addr, a.port, a.name or socket.gethostname())
    node = Node(a.run_dir, place)
    seen: list[int] = []

    def on_signal(signum: int, _frame: Any) -> None:
        seen.append(signum)
        if node.stopping and node.proc is not None and signum in (signal.SIGINT, signal.SIGTERM):
            node.proc.stop(signal.SIGKILL)
        else:
            node.stop()

    try:
        with trap_signals(on_signal, (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)):
            rc = node.run_node()
    except PreflightError as e:
        sys.stderr.write(f"[ftl node] pre-flight failed: {e}\n")
        return EXIT_PREFLIGHT
    requeue_after_signal(node, rc, seen)
    return rc


def requeue_after_signal(node: Node, rc: int, seen: list[int]) -> None:
    """In a job submitted from an exported script, USR1/USR2 mean "time limit or preemption": once the
    trainer has saved and stopped, node 0 requeues the job (an `ftl cancel` sends TERM instead)."""
    job_id = os.environ.get("SLURM_JOB_ID")
    if not job_id or node.place is None or node.place.rank != 0 or rc != EXIT_INTERRUPTED:
        return
    if not any(s in (signal.SIGUSR1, signal.SIGUSR2) for s in seen) or node.run.state().get("stop_requested"):
        return
    r = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True, timeout=60)
    sys.stderr.write(f"[ftl node] requeued SLURM job {job_id}" if r.returncode == 0 else
                     f"[ftl node] could not requeue SLURM job {job_id}: {r.stderr.strip()}")
    sys.stderr.write("\n")
