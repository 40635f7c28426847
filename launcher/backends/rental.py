"""Rented GPUs (RunPod, Lambda): provision, bootstrap, sync, launch over SSH, watch the spend, fetch, tear down.

Why a backend of its own on top of the SSH one: a rental is an SSH cluster whose hosts exist only for the
run. So this module adds what the SSH path does not do, and nothing else:

* provision: the cheapest available offer for the profile's GPU (region / cloud tier), instances named
  `ftl-<run id>-<rank>` (a RunPod Instant Cluster `ftl-<run id>` for several nodes), each recorded in
  state.json `instances` the moment the provider answers, so `ftl down RUN` / `ftl down --orphans` always
  find them, even after a kill -9 (the provider lists them by name too);
* a per-run SSH key pair in the run directory (ssh/id_ed25519, mode 600), sent to the provider as the
  instance's authorised key; the private key is never printed and is deleted once the instances are gone;
* bootstrap: the profile's `setup` lines, then the interpreter (`cluster.python`, default python3) must
  import ftl; if it cannot, the local ftl source is copied over and pip-installed there (the instance
  reaches PyPI; or name an `image` with ftl installed);
* sync: recipe.yaml, plan.json, accelerate.yaml, deepspeed.json and the recipe's local data and model
  folder go to `<workdir>/runs/<run id>` on every node (tar over SSH; paths in the remote copy point at
  the copies); state.json `remote_run_dir` tells the SSH path where;
* launch through SshBackend (hosts = the instances' SSH endpoints, rendezvous on the private address);
* budget guard: spend = price x time since each instance was created; at budget.max_cost_usd /
  max_hours (or --budget / --deadline) the nodes get SIGTERM (they save a checkpoint), results come back;
* while training, the newest COMPLETE checkpoint comes back every FTL_SYNC_EVERY_S (10 min), so an
  instance that dies or becomes unreachable takes at most that much with it;
* after the nodes end (any way: done, failed, Ctrl-C, budget), checkpoints/, output/, metrics and
  result.json are fetched, then every instance is terminated in a `finally`.
"""

from __future__ import annotations

import datetime as dt
import io
import os
import shlex
import signal
import subprocess
import tarfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from launcher.backends import say
from launcher.backends.ssh import Node, SshBackend, SshHandle, remote_dir, run_ssh, ssh_argv
from launcher.errors import FtlError
from launcher.runs import ACTIVE, Run, pid_alive, utcnow, write_atomic

RENTED = ("runpod", "lambda")
READY_TIMEOUT_S = 900.0  # Lambda documents up to 15 min for some types
BUDGET_POLL_S = 2.0
FETCH = ("checkpoints", "output", "metrics.jsonl", "result.json", "preflight", "logs")
SYNCED = ("recipe.yaml", "plan.json", "accelerate.yaml", "deepspeed.json", "command.sh")


class RentalError(FtlError):
    pass


def sync_every_s() -> float:
    """How often the newest complete checkpoint comes back while training (default 10 minutes)."""
    return float(os.environ.get("FTL_SYNC_EVERY_S", "600"))


def _env_float(name: str, default: float | None) -> float | None:
    v = os.environ.get(name)
    return float(v) if v else default


def provider_options(provider: str) -> dict[str, Any]:
    """Client options; env overrides exist for tests and impatient users (poll period, Lambda's launch pace)."""
    opts: dict[str, Any] = {}
    poll = _env_float("FTL_PROVIDER_POLL_S", None)
    if poll is not None:
        opts["poll_s"] = poll
    pace = _env_float("FTL_LAMBDA_LAUNCH_INTERVAL_S", None)
    if provider == "lambda" and pace is not None:
        opts["launch_interval_s"] = pace
    return opts


def client(provider: str) -> Any:
    from launcher.providers import get_provider

    return get_provider(provider, **provider_options(provider))


def instance_name(run_id: str, rank: int) -> str:
    return f"ftl-{run_id}-{rank}"


def _epoch(iso: str | None) -> float | None:
    if not iso:
        return None
    try:
        return dt.datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def spend(instances: list[dict[str, Any]], now: float | None = None) -> float:
    """USD so far: each instance's hourly price x the time since the provider created it (until it ended)."""
    now = time.time() if now is None else now
    total = 0.0
    for i in instances:
        start = _epoch(i.get("created_at"))
        if start is None or not i.get("price_per_hour"):
            continue
        end = _epoch(i.get("terminated_at")) or now
        total += float(i["price_per_hour"]) * max(0.0, end - start) / 3600
    return total


def expected(p: Any) -> tuple[float | None, float | None]:
    """(seconds, USD) the launch is expected to take: the estimate plus instance boot and weight download."""
    from launcher.estimate.compute import total_cost
    from launcher.plan import setup_seconds

    est = p.estimate
    if est is None or est.total_time_s is None:
        return None, None
    cl = p.recipe.cluster
    weights = int(getattr(est.arch, "published_bytes", 0) or 0)
    total = est.total_time_s + setup_seconds(cl, weights)
    return total, total_cost(total, cl.world_size, cl.price_per_gpu_hour)


# ---------------------------------------------------------------------------------------------
# keys and files


def make_key(run: Run) -> tuple[Path, str]:
    """A fresh ed25519 pair for this run only (ssh/id_ed25519, 600); returns (private key path, public key)."""
    d = run.dir / "ssh"
    d.mkdir(mode=0o700, exist_ok=True)
    key = d / "id_ed25519"
    if not key.is_file():
        r = subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"ftl-{run.id}", "-f", str(key)],
                           capture_output=True, text=True)
        if r.returncode != 0:
            raise RentalError(f"ssh-keygen failed: {r.stderr.strip()}")
    os.chmod(key, 0o600)
    return key, (d / "id_ed25519.pub").read_text().strip()


def _tar_bytes(members: list[tuple[Path, str]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for src, arc in members:
            tar.add(str(src), arcname=arc)
    return buf.getvalue()


def _tar_text(tar: tarfile.TarFile, name: str, text: str) -> None:
    data = text.encode()
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), 0o644, int(time.time())
    tar.addfile(info, io.BytesIO(data))


# ---------------------------------------------------------------------------------------------
# the backend


@dataclass
class RentalHandle(SshHandle):
    provider: Any = None
    guard: threading.Thread | None = None
    done: threading.Event = field(default_factory=threading.Event)
    budget_hit: str | None = None


class RentalBackend(SshBackend):
    """SSH launch on instances this backend rents for the run and always gives back."""

    def __init__(self, provider: str, echo: bool = True, budget_usd: float | None = None,
                 deadline_s: float | None = None):
        super().__init__(echo=echo)
        self.name = provider
        self.provider_name = provider
        self.budget_usd, self.deadline_s = budget_usd, deadline_s
        self._client: Any = None
        self._previous: dict[int, Any] = {}
        self._interrupted: int | None = None  # a stop signal that came inside a provider call
        self._in_provider_call = 0
        self._fetch_lock = threading.Lock()  # the periodic sync and the final fetch write the same folders

    @property
    def client(self) -> Any:
        if self._client is None:
            from launcher.providers import get_provider

            raw = get_provider(self.provider_name, **{"sleep": self._sleep, **provider_options(self.provider_name)})
            self._client = _Guarded(raw, self)
        return self._client

    def _sleep(self, seconds: float) -> None:
        """The provider clients' sleep (polls, backoff): a safe point to act on a pending Ctrl-C."""
        end = time.monotonic() + seconds
        while True:
            self._raise_if_interrupted()
            left = end - time.monotonic()
            if left <= 0:
                return
            time.sleep(min(left, 0.1))

    def _raise_if_interrupted(self) -> None:
        if self._interrupted is not None:
            signum, self._interrupted = self._interrupted, None
            raise KeyboardInterrupt(signal.Signals(signum).name)

    # -- messages -----------------------------------------------------------------------------------
    def _note(self, run: Run, msg: str) -> None:
        say(run, msg, self._out_lock)

    # -- signals: Ctrl-C, SIGTERM, SIGHUP during provisioning unwind (the finally terminates) -------------
    def _trap(self) -> None:
        """An exception raised by a signal handler in the middle of an HTTP call can leave httpx's connection
        pool locked, and the teardown's own calls then hang: inside a provider call the signal is only noted,
        and raised at the next safe point (the client's sleeps, or when the call returns)."""
        if threading.current_thread() is not threading.main_thread():
            return

        def interrupt(signum, _frame):
            if self._in_provider_call:
                self._interrupted = signum
                return
            raise KeyboardInterrupt(signal.Signals(signum).name)

        for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            self._previous[s] = signal.signal(s, interrupt)

    def _untrap(self) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous.clear()

    # -- limits -------------------------------------------------------------------------------------
    def limits(self, recipe: Any) -> tuple[float | None, float | None]:
        """(USD cap, seconds cap): the command line's, else the recipe's or profile's budget."""
        b = recipe.effective_budget
        usd = self.budget_usd if self.budget_usd is not None else b.max_cost_usd
        secs = self.deadline_s if self.deadline_s is not None else (b.max_hours * 3600 if b.max_hours else None)
        return usd, secs

    # -- launch -------------------------------------------------------------------------------------
    def launch(self, run: Run, resume_from: str | None = None, spec: Any = None,
               secrets: dict[str, str] | None = None) -> RentalHandle:
        from launcher.recipe import recipe_from_dict

        recipe = recipe_from_dict(run.recipe_dict(), run.recipe_path)
        usd, secs = self.limits(recipe)
        run.update_state(status="created", rental={"provider": self.provider_name, "budget_usd": usd,
                                                    "deadline_s": secs}, instances=run.state().get("instances") or [])
        self._trap()
        try:
            key, pub = make_key(run)
            insts = self.provision(run, recipe, pub)
            nodes = self._nodes_for(recipe, insts, key)
            python = self.bootstrap(run, recipe, nodes)
            for n in nodes:
                n.python = python
            rdir = self.sync(run, recipe, nodes, resume_from)
            self._record_hosts(run, nodes)
            run.update_state(remote_run_dir=str(rdir))
            if usd is not None and spend(run.state().get("instances") or []) >= usd:
                raise RentalError(f"budget ${usd:.2f} already spent before training started; nothing was trained")
            base = super().launch(run, resume_from, spec, secrets)
        except BaseException as e:
            self._untrap()
            if isinstance(e, KeyboardInterrupt):
                self._note(run, f"ftl: interrupted ({e or 'SIGINT'}) while provisioning; terminating the instances")
                run.update_state(status="stopped", ended=utcnow(), error="interrupted while provisioning")
            elif not isinstance(e, SystemExit):
                run.update_state(status="failed", ended=utcnow(), error=str(e))
            self.teardown(run)
            raise
        h = RentalHandle(base.run, base.nodes, base.stop_signal, base.killed, base.tails, provider=self.client)
        if usd is not None or secs is not None:
            h.guard = threading.Thread(target=self._guard, args=(h, usd, secs), daemon=True)
            h.guard.start()
        threading.Thread(target=self._sync_back, args=(h,), daemon=True).start()
        return h

    # -- checkpoints back while training --------------------------------------------------------------
    def _sync_back(self, h: RentalHandle) -> None:
        """Every FTL_SYNC_EVERY_S, the newest COMPLETE checkpoint (every node's part of it) and metrics.jsonl
        come back, so an instance that dies takes at most that much training with it."""
        every = sync_every_s()
        while not h.done.wait(every):
            try:
                self.fetch_newest_checkpoint(h.run, h.nodes)
            except Exception as e:  # noqa: BLE001 - a failed sync must never stop training
                self._note(h.run, f"ftl: could not bring the newest checkpoint back ({e}); training goes on")

    def fetch_newest_checkpoint(self, run: Run, nodes: list[Node]) -> str | None:
        with self._fetch_lock:
            return self._fetch_newest_checkpoint(run, nodes)

    def _fetch_newest_checkpoint(self, run: Run, nodes: list[Node]) -> str | None:
        q = shlex.quote
        rdir = q(str(remote_dir(run)))
        node0 = min(nodes, key=lambda n: n.rank)
        find = (f"cd {rdir} && for d in $(ls -d checkpoints/checkpoint-* 2>/dev/null | sort -t- -k2 -n); do "
                f"[ -f \"$d/COMPLETE\" ] && echo \"$d\"; done | tail -n 1")
        r = run_ssh(node0, run.dir, find, timeout=60)
        name = r.stdout.strip().rsplit("/", 1)[-1] if r.returncode == 0 else ""
        st = run.state()
        if not name or name == st.get("synced_checkpoint"):
            return None
        for n in sorted(nodes, key=lambda m: -m.rank):  # every node's shards; node 0's files (COMPLETE) last
            extra = " metrics.jsonl" if n is node0 else ""
            cmd = f"cd {rdir} && tar cf - {q('checkpoints/' + name)}{extra} 2>/dev/null"
            p = subprocess.run(ssh_argv(n, run.dir, cmd), capture_output=True, timeout=3600)
            if not p.stdout:
                if n is node0:
                    raise RentalError(f"{n.label}: {p.stderr.decode(errors='replace').strip()[-200:] or 'no data'}")
                continue
            with tarfile.open(fileobj=io.BytesIO(p.stdout), mode="r") as tar:
                safe = [m for m in tar.getmembers() if not m.name.startswith(("/", "..")) and ".." not in Path(m.name).parts
                        and (m.isfile() or m.isdir())]
                tar.extractall(run.dir, members=safe, filter="data")
        old = st.get("synced_checkpoint")
        if old and old != name and (run.checkpoints_dir / old).is_dir():
            import shutil

            shutil.rmtree(run.checkpoints_dir / old, ignore_errors=True)  # only the newest is kept while training
        run.update_state(synced_checkpoint=name)
        self._note(run, f"ftl: brought {name} back into {run.checkpoints_dir}")
        return name

    def provision(self, run: Run, recipe: Any, public_key: str) -> list[Any]:
        """Create the instances (next offer on no capacity), record each at once, wait until every one is ready."""
        from launcher.providers import NoCapacity, ProviderError, ProviderTimeout

        cl, prov = recipe.cluster, self.client
        offers = [o for o in prov.offers(cl.gpu, cl.gpus_per_node) if o.available
                  and (not cl.region or o.region == cl.region)
                  and (not cl.cloud_type or o.cloud_type in (None, cl.cloud_type.upper()))]
        what = f"{cl.gpus_per_node}x {cl.gpu or 'any GPU'}" + (f" in {cl.region}" if cl.region else "")
        if not offers:
            raise RentalError(f"{self.provider_name}: no offer with capacity for {what} now; try another GPU, "
                              "region or provider (ftl prices --refresh lists them)")
        env = {"FTL_RUN_ID": run.id}
        tried: list[str] = []
        for offer in offers:
            where = f"{offer.gpus}x {offer.gpu_type} {offer.region or ''} at ${offer.price_per_hour:g}/h".strip()
            self._note(run, f"ftl: renting {cl.nodes} x {where} on {self.provider_name}")
            try:
                insts = self._create(run, recipe, offer, public_key, env)
            except NoCapacity as e:
                tried.append(f"{where}: {e}")
                self.teardown(run, quiet=True)
                continue
            break
        else:
            raise RentalError(f"{self.provider_name}: no capacity for {what}; tried " + "; ".join(tried))
        timeout = _env_float("FTL_PROVIDER_READY_TIMEOUT_S", READY_TIMEOUT_S) or READY_TIMEOUT_S
        ready = []
        for inst in insts:
            try:
                got = prov.wait_ready(inst.id, timeout)
            except ProviderTimeout as e:
                raise RentalError(f"{e}; terminated") from None
            except ProviderError as e:
                raise RentalError(str(e)) from None
            got.rank = inst.rank if got.rank is None else got.rank
            ready.append(got)
            self._record(run, got)
        self._note(run, "ftl: ready: " + ", ".join(f"{i.name} ({i.ssh_user}@{i.ssh_host}:{i.ssh_port})" for i in ready))
        return sorted(ready, key=lambda i: i.rank or 0)

    def _create(self, run: Run, recipe: Any, offer: Any, public_key: str, env: dict[str, str]) -> list[Any]:
        cl, prov = recipe.cluster, self.client
        image = cl.image
        if cl.nodes > 1 and self.provider_name == "runpod":  # one Instant Cluster: ranks and a private network
            name = f"ftl-{run.id}"
            run.update_state(cluster_name=name)
            members = prov.create_cluster(name, offer, cl.nodes, public_key, image=image, env=env)
            for m in members:
                self._record(run, m)
            return members
        out = []
        for rank in range(cl.nodes):
            inst = prov.create(instance_name(run.id, rank), offer, public_key, image=image, env=env)
            inst.rank = rank
            self._record(run, inst)
            out.append(inst)
        return out

    def _record(self, run: Run, inst: Any) -> None:
        """Write (or refresh) an instance in state.json `instances`: the record `ftl down` works from."""
        st = run.state()
        rows = list(st.get("instances") or [])
        old = next((r for r in rows if r.get("id") == inst.id), None)
        row = {"provider": inst.provider, "id": inst.id, "name": inst.name, "rank": inst.rank,
               "cluster_id": inst.cluster_id, "gpu_type": inst.gpu_type, "gpus": inst.gpus, "region": inst.region,
               "price_per_hour": inst.price_per_hour, "status": inst.status, "ssh_host": inst.ssh_host,
               "ssh_port": inst.ssh_port, "ssh_user": inst.ssh_user, "private_ip": inst.private_ip,
               "created_at": (old or {}).get("created_at") or utcnow(), "terminated_at": None}
        if old is None:
            rows.append(row)
        else:
            old.update({k: v for k, v in row.items() if v is not None or k == "terminated_at"})
        run.update_state(instances=rows)

    @staticmethod
    def _nodes_for(recipe: Any, insts: list[Any], key: Path) -> list[Node]:
        """SSH nodes for the instances; FTL_RENTAL_SSH_USER replaces the provider's login user (root on RunPod,
        ubuntu on Lambda) for images that use another one."""
        user = os.environ.get("FTL_RENTAL_SSH_USER")
        return [Node(rank=r, host=str(i.ssh_host), port=int(i.ssh_port or 22), user=user or i.ssh_user, key=str(key),
                     address=i.private_ip or i.ssh_host, python=recipe.cluster.python) for r, i in enumerate(insts)]

    def _record_hosts(self, run: Run, nodes: list[Node]) -> None:
        """The hosts go into the run's recipe.yaml: the SSH path (and ftl status/logs later) reads them there."""
        d = run.recipe_dict()
        d.setdefault("cluster", {})["hosts"] = [{"host": n.host, "port": n.port, "user": n.user, "key": n.key,
                                                 "address": n.address, "python": n.python} for n in nodes]
        write_atomic(run.recipe_path, yaml.safe_dump(d, sort_keys=False))

    # -- bootstrap ----------------------------------------------------------------------------------
    def bootstrap(self, run: Run, recipe: Any, nodes: list[Node]) -> str:
        """Run the profile's setup lines, then make sure the interpreter imports ftl (install it if not)."""
        cl = recipe.cluster
        python = cl.python or "python3"
        q = shlex.quote
        for n in nodes:
            r = self._ssh_retry(run, n, "true")  # first contact: sshd may still be starting
            if r.returncode != 0:
                raise RentalError(f"{n.label}: not reachable over SSH: {r.stderr.strip()[-300:]}")
            for line in cl.setup:
                r = run_ssh(n, run.dir, line, timeout=1800)
                if r.returncode != 0:
                    raise RentalError(f"{n.label}: setup line failed (exit {r.returncode}): {line}: "
                                      f"{(r.stderr or r.stdout).strip()[-300:]}")
            check = f"{q(python)} -c {q('import launcher.node')}"
            if run_ssh(n, run.dir, check, timeout=120).returncode != 0:
                self._note(run, f"ftl: {n.label}: {python} cannot import ftl; installing it from this checkout")
                self._install_ftl(run, n, python)
        self._note(run, f"ftl: bootstrapped {len(nodes)} node(s) ({python})")
        return python

    def _ssh_retry(self, run: Run, n: Node, cmd: str, tries: int = 10) -> subprocess.CompletedProcess:
        r = run_ssh(n, run.dir, cmd)
        for _ in range(tries - 1):
            if r.returncode == 0:
                break
            time.sleep(2)
            r = run_ssh(n, run.dir, cmd)
        return r

    def _install_ftl(self, run: Run, n: Node, python: str) -> None:
        src = Path(__file__).resolve().parents[2]
        if not (src / "pyproject.toml").is_file():
            raise RentalError(f"{n.label}: {python} cannot import ftl and there is no source tree to install; name an "
                              "image with ftl installed (cluster.image) or add setup lines that install it")
        members = [(src / "pyproject.toml", "ftl-src/pyproject.toml"), (src / "launcher", "ftl-src/launcher")]
        members += [(src / f, f"ftl-src/{f}") for f in ("README.md",) if (src / f).is_file()]
        q = shlex.quote
        cmd = (f"d=$(mktemp -d) && tar xf - -C \"$d\" && {q(python)} -m pip install -q \"$d/ftl-src\"")
        r = self._push(run, n, _tar_bytes(members), cmd, timeout=3600)
        if r.returncode != 0:
            raise RentalError(f"{n.label}: installing ftl failed: {r.stderr.decode(errors='replace').strip()[-400:]}")

    # -- sync ---------------------------------------------------------------------------------------
    def _base(self, run: Run, recipe: Any, node: Node) -> Path:
        if recipe.cluster.workdir:
            return Path(recipe.cluster.workdir)
        r = run_ssh(node, run.dir, "echo \"$HOME\"")
        home = r.stdout.strip().splitlines()[-1] if r.returncode == 0 and r.stdout.strip() else "/tmp"
        return Path(home) / "ftl"

    def sync(self, run: Run, recipe: Any, nodes: list[Node], resume_from: str | None) -> Path:
        """Copy the run's files, local data and local model folder to <workdir>/runs/<id> on every node."""
        rdir = self._base(run, recipe, nodes[0]) / "runs" / run.id
        members: list[tuple[Path, str]] = []
        d = run.recipe_dict()
        model = Path(str(d.get("model") or ""))
        if model.is_absolute() and model.is_dir():
            members.append((model, f"inputs/model/{model.name}"))
            d["model"] = str(rdir / "inputs" / "model" / model.name)
        data = (d.get("data") or {}).get("path")
        if data and Path(data).is_absolute() and Path(data).exists():
            members.append((Path(data), f"inputs/data/{Path(data).name}"))
            d["data"]["path"] = str(rdir / "inputs" / "data" / Path(data).name)
        d.setdefault("cluster", {})["workdir"] = str(rdir.parent.parent)
        if resume_from:
            ck = Path(resume_from)
            members.append((ck, f"checkpoints/{ck.name}"))
        local = str(run.dir)
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            for src, arc in members:
                tar.add(str(src), arcname=arc)
            for name in SYNCED:
                p = run.dir / name
                if p.is_file() and name != "recipe.yaml":
                    _tar_text(tar, name, p.read_text().replace(local, str(rdir)))
            _tar_text(tar, "recipe.yaml", yaml.safe_dump(d, sort_keys=False).replace(local, str(rdir)))
            _tar_text(tar, "state.json", '{"run_id": %s, "status": "running", "cwd": %s}\n'
                      % (_j(run.id), _j(str(rdir))))
        payload = buf.getvalue()
        q = shlex.quote
        for n in nodes:
            r = self._push(run, n, payload, f"mkdir -p {q(str(rdir / 'logs'))} && tar xf - -C {q(str(rdir))}")
            if r.returncode != 0:
                raise RentalError(f"{n.label}: copying the run to {rdir} failed: "
                                  f"{r.stderr.decode(errors='replace').strip()[-300:]}")
        self._note(run, f"ftl: synced the run ({len(payload) / 1e6:.1f} MB) to {rdir} on {len(nodes)} node(s)")
        return rdir

    @staticmethod
    def _push(run: Run, n: Node, payload: bytes, cmd: str, timeout: float = 1800) -> subprocess.CompletedProcess:
        try:
            return subprocess.run(ssh_argv(n, run.dir, cmd), input=payload, capture_output=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return subprocess.CompletedProcess([], 255, b"", f"timed out after {timeout:.0f} s".encode())

    # -- results back -------------------------------------------------------------------------------
    def after_nodes_ended(self, handle: SshHandle) -> None:
        if isinstance(handle, RentalHandle):
            handle.done.set()  # no more periodic syncs or budget checks
        self.fetch(handle.run, handle.nodes)

    def fetch(self, run: Run, nodes: list[Node]) -> None:
        """checkpoints/, output/, metrics, result.json, pre-flight answers and node logs: node 0's win."""
        with self._fetch_lock:
            self._fetch(run, nodes)

    def _fetch(self, run: Run, nodes: list[Node]) -> None:
        rdir = remote_dir(run)
        q = shlex.quote
        names = " ".join(q(f) for f in FETCH)
        cmd = f"cd {q(str(rdir))} && tar cf - $(for f in {names}; do [ -e \"$f\" ] && echo \"$f\"; done)"
        for n in sorted(nodes, key=lambda m: -m.rank):
            try:
                p = subprocess.run(ssh_argv(n, run.dir, cmd), capture_output=True, timeout=3600)
            except subprocess.TimeoutExpired:
                self._note(run, f"ftl: {n.label}: fetching results timed out")
                continue
            if p.returncode != 0 or not p.stdout:
                self._note(run, f"ftl: {n.label}: could not fetch results: "
                                f"{p.stderr.decode(errors='replace').strip()[-300:]}")
                continue
            with tarfile.open(fileobj=io.BytesIO(p.stdout), mode="r") as tar:
                safe = [m for m in tar.getmembers() if not m.name.startswith(("/", "..")) and ".." not in Path(m.name).parts
                        and (m.isfile() or m.isdir())]
                tar.extractall(run.dir, members=safe, filter="data")
        self._note(run, f"ftl: fetched results from {len(nodes)} node(s) into {run.dir}")

    # -- watch --------------------------------------------------------------------------------------
    def _guard(self, h: RentalHandle, usd: float | None, secs: float | None) -> None:
        """Stop the run (SIGTERM: checkpoint) when the spend or the elapsed time reaches its cap."""
        while not h.done.wait(BUDGET_POLL_S):
            insts = h.run.state().get("instances") or []
            cost = spend(insts)
            starts = [s for s in (_epoch(i.get("created_at")) for i in insts) if s]
            elapsed = time.time() - min(starts) if starts else 0.0
            why = None
            if usd is not None and cost >= usd:
                why = f"budget reached: ${cost:.2f} of ${usd:.2f}"
            elif secs is not None and elapsed >= secs:
                why = f"deadline reached: {elapsed / 3600:.2f} h of {secs / 3600:.2f} h"
            if why and h.stop_signal is None:
                h.budget_hit = why
                h.stop_signal = signal.SIGTERM
                h.run.update_state(stop_requested=utcnow(), budget_stop=why)
                self._say(h, f"ftl: {why}; asking every node to save a checkpoint and stop")
                self._signal_all(h, signal.SIGTERM)
                return

    def wait(self, handle: RentalHandle) -> str:
        try:
            status = super().wait(handle)
            if handle.budget_hit:
                handle.run.update_state(error=handle.budget_hit)
            return status
        finally:
            handle.done.set()
            self._untrap()
            self.teardown(handle.run)
            try:  # cost.json again, now that every instance has its termination time
                from launcher.report import write_cost

                write_cost(handle.run)
            except Exception:  # noqa: BLE001 - a report never fails a run
                pass

    # -- tear down ----------------------------------------------------------------------------------
    def teardown(self, run: Run, quiet: bool = False) -> list[str]:
        """Terminate every instance of the run (recorded ones, and any the provider lists under its names)."""
        old = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)} \
            if threading.current_thread() is threading.main_thread() else {}
        try:
            self._interrupted = None  # nothing may interrupt the teardown's own calls
            gone, errors = terminate_run(run, self._client._provider if self._client is not None else None)
        finally:
            for s, h in old.items():
                signal.signal(s, h)
        if gone and not quiet:
            self._note(run, f"ftl: terminated {len(gone)} instance(s): {', '.join(gone)}; spent about "
                            f"${spend(run.state().get('instances') or []):.2f}")
        if errors:
            self._note(run, "ftl: COULD NOT TERMINATE: " + "; ".join(errors) + f" (retry: ftl down {run.id})")
        return gone

    def status(self, run: Run) -> dict[str, Any]:
        st = run.state()
        if st.get("status") in ACTIVE and not pid_alive(st.get("launcher_pid")) and st.get("instances"):
            alive = [i for i in st["instances"] if not i.get("terminated_at")]
            if alive and not st.get("hosts"):
                return st
        return super().status(run)


def salvage(run: Run) -> bool:
    """A run whose ftl died while its nodes train on: ask every node to save a checkpoint and stop, wait (at
    most FTL_STOP_GRACE_S), and fetch what they have, so that terminating loses nothing `ftl launch --resume`
    needs. False when there is nothing to reach (no hosts recorded, or the run's key is gone)."""
    from launcher.backends.ssh import stop_grace_s

    st = run.state()
    provider = (st.get("rental") or {}).get("provider") or st.get("backend")
    if provider not in RENTED or not st.get("hosts") or not st.get("remote_run_dir") \
            or not (run.dir / "ssh" / "id_ed25519").is_file():
        return False
    b = RentalBackend(provider, echo=False)
    h = SshHandle(run, b._nodes(run))
    b._note(run, f"ftl: run {run.id}: its ftl is gone; asking every node to save a checkpoint and stop before terminating")
    run.update_state(stop_requested=utcnow())
    b._signal_all(h, signal.SIGTERM)
    deadline = time.monotonic() + stop_grace_s()
    while time.monotonic() < deadline and any(b._probe(run, n) == "alive" for n in h.nodes):
        time.sleep(1.0)
    b.fetch(run, h.nodes)
    return True


class _Guarded:
    """A provider client whose calls defer stop signals to safe points (see RentalBackend._trap)."""

    def __init__(self, provider: Any, backend: RentalBackend):
        self._provider, self._backend = provider, backend

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._provider, name)
        if not callable(attr):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            b = self._backend
            b._in_provider_call += 1
            try:
                result = attr(*args, **kwargs)
            except BaseException:
                b._in_provider_call -= 1
                if not b._in_provider_call:
                    b._raise_if_interrupted()  # a stop that came during the call wins over its error
                raise
            b._in_provider_call -= 1
            if not b._in_provider_call:
                b._raise_if_interrupted()
            return result

        return call


def _rank_suffix(name: str, run_id: str) -> bool:
    head = f"ftl-{run_id}-"
    return name.startswith(head) and name[len(head):].isdigit()


def _j(s: str) -> str:
    import json

    return json.dumps(s)


def terminate_run(run: Run, prov: Any = None) -> tuple[list[str], list[str]]:
    """Terminate the run's instances: recorded ids, plus anything named after the run. ([done], [errors])."""
    from launcher.providers import ProviderError

    st = run.state()
    name = (st.get("rental") or {}).get("provider") or st.get("backend")
    if name not in RENTED:
        return [], []
    try:
        prov = prov or client(name)
    except ProviderError as e:
        return [], [str(e)]
    rows = list(st.get("instances") or [])
    ids = {r["id"]: r for r in rows if not r.get("terminated_at")}
    errors_list: list[str] = []
    try:
        named = [i for i in prov.list(prefix=f"ftl-{run.id}-") if _rank_suffix(i.name, run.id)]
        for inst in named + prov.find(f"ftl-{run.id}"):  # find: also the members of the cluster of that name
            if inst.id not in ids:
                ids[inst.id] = {"id": inst.id, "name": inst.name}
    except ProviderError as e:
        errors_list.append(f"listing {name} instances: {e}")
    done: list[str] = []
    for iid, row in ids.items():
        try:
            prov.terminate(iid)
            done.append(str(row.get("name") or iid))
            row["terminated_at"] = utcnow()
        except ProviderError as e:
            errors_list.append(f"{row.get('name') or iid}: {e}")
    if done:
        for r in rows:
            if r["id"] in ids and ids[r["id"]].get("terminated_at"):
                r["terminated_at"] = ids[r["id"]]["terminated_at"]
                r["status"] = "terminated"
        run.update_state(instances=rows)
    if not errors_list:
        key = run.dir / "ssh" / "id_ed25519"
        if key.exists() and not any(not r.get("terminated_at") for r in rows):
            key.unlink()  # useless now; a private key left on disk is only a risk
    return done, errors_list


# ---------------------------------------------------------------------------------------------
# ftl down / ftl ps


def live_run(run: Run) -> bool:
    st = run.state()
    return st.get("status") in ACTIVE and pid_alive(st.get("launcher_pid"))


def configured() -> list[str]:
    """The rental providers with an API key configured."""
    from launcher.providers import AuthError
    from launcher.providers.http import api_key

    out = []
    for name in RENTED:
        try:
            api_key(name)
            out.append(name)
        except AuthError:
            pass
    return out


def owner(inst: Any, runs: list[Run]) -> Run | None:
    """The run an instance belongs to: by recorded id, else by its name ftl-<run id>[-rank]."""
    for r in runs:
        st = r.state()
        if any(i.get("id") == inst.id for i in st.get("instances") or []):
            return r
        if inst.cluster_id and any(i.get("cluster_id") == inst.cluster_id for i in st.get("instances") or []):
            return r
    for r in runs:
        if inst.name == f"ftl-{r.id}" or inst.name.startswith(f"ftl-{r.id}-"):
            return r
    return None


def rented_instances(providers: list[str] | None = None) -> list[tuple[Any, Run | None]]:
    """(instance, owning run or None) for every live ftl-* instance at each configured provider."""
    from launcher.runs import list_runs

    runs = list_runs()
    out = []
    for name in providers if providers is not None else configured():
        for inst in client(name).list(prefix="ftl-"):
            out.append((inst, owner(inst, runs)))
    return out


def orphans(providers: list[str] | None = None) -> list[Any]:
    """Live ftl-* instances that belong to no live run (a killed ftl, a lost run directory)."""
    return [i for i, r in rented_instances(providers) if r is None or not live_run(r)]


def down_orphans(providers: list[str] | None = None) -> tuple[list[Any], list[str]]:
    from launcher.providers import ProviderError
    from launcher.runs import list_runs

    found = orphans(providers)
    errors = []
    runs = list_runs()
    for r in {id(r): r for r in (owner(i, runs) for i in found) if r is not None}.values():
        try:
            salvage(r)
        except (FtlError, OSError) as e:
            errors.append(f"run {r.id}: could not save its results before terminating: {e}")
    for inst in found:
        try:
            client(inst.provider).terminate(inst.id)
        except ProviderError as e:
            errors.append(f"{inst.name} ({inst.id}): {e}")
            continue
        r = owner(inst, runs)
        if r is not None:
            rows = r.state().get("instances") or []
            for row in rows:
                if row.get("id") == inst.id:
                    row["terminated_at"], row["status"] = utcnow(), "terminated"
            st = r.state()
            changes: dict[str, Any] = {"instances": rows}
            if st.get("status") in ACTIVE:
                changes.update(status="stopped", ended=utcnow(), error="its ftl process died; instances terminated "
                               "by ftl down --orphans")
            r.update_state(**changes)
            if all(row.get("terminated_at") for row in rows):
                (r.dir / "ssh" / "id_ed25519").unlink(missing_ok=True)
    return found, errors


__all__ = ["RentalBackend", "RentalError", "down_orphans", "expected", "orphans", "rented_instances", "salvage",
           "spend", "terminate_run"]
