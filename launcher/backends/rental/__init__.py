"""Rented GPUs (RunPod, Lambda): provision, bootstrap, sync, launch over SSH, watch the spend, fetch, tear down.

A rental is an SSH cluster whose hosts exist only for the run, so this backend holds an SSH launcher
(launcher.backends.ssh) and hands it the instances as its hosts; what it adds, by phase:

* provision (provision.py): the cheapest available offer for the profile's GPU (region / cloud tier),
  instances named `ftl-<run id>-<rank>` (a RunPod Instant Cluster `ftl-<run id>` for several nodes), each
  recorded in state.json `instances` the moment the provider answers, so `ftl down RUN` / `ftl down
  --orphans` always find them, even after a kill -9 (the provider lists them by name too);
* a per-run SSH key pair in the run directory (ssh/id_ed25519, mode 600), sent to the provider as the
  instance's authorised key; the private key is never printed and is deleted once the instances are gone;
* bootstrap and sync (transfer.py): the profile's `setup` lines, then the interpreter (`cluster.python`,
  default python3) must import ftl, else the local ftl source is copied over and pip-installed; then
  recipe.yaml, plan.json, accelerate.yaml, deepspeed.json and the recipe's local data and model folder go to
  `<workdir>/runs/<run id>` on every node (state.json `remote_run_dir` tells the SSH path where);
* budget guard: spend = price x time since each instance was created; at budget.max_cost_usd /
  max_hours (or --budget / --deadline) the nodes get SIGTERM (they save a checkpoint), results come back;
* while training, the newest COMPLETE checkpoint comes back every FTL_SYNC_EVERY_S (10 min), so an
  instance that dies or becomes unreachable takes at most that much with it;
* after the nodes end (any way: done, failed, Ctrl-C, budget), checkpoints/, output/, metrics and
  result.json are fetched, then every instance is terminated in a `finally` (fleet.py, which also serves
  `ftl down` and `ftl ps`).
"""

from __future__ import annotations

import os
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from launcher.backends.base import Backend, say
from launcher.backends.rental import fleet, provision, transfer
from launcher.backends.rental.provision import instance_name
from launcher.backends.rental.transfer import RentalError
from launcher.backends.ssh import Node, SshBackend, SshHandle
from launcher.core.files import iso_epoch, utcnow
from launcher.core.procs import STOP_SIGNALS, pid_alive
from launcher.render import LaunchSpec
from launcher.rundir import ACTIVE, Run
from launcher.rundir.cost import spend, write_cost
from launcher.spec.recipe import Recipe, recipe_from_dict

BUDGET_POLL_S = 2.0


def sync_every_s() -> float:
    """How often the newest complete checkpoint comes back while training (default 10 minutes)."""
    return float(os.environ.get("FTL_SYNC_EVERY_S", "600"))


@dataclass
class RentalHandle:
    ssh: SshHandle
    guard: threading.Thread | None = None
    done: threading.Event = field(default_factory=threading.Event)
    budget_hit: str | None = None

    @property
    def run(self) -> Run:
        return self.ssh.run

    @property
    def nodes(self) -> list[Node]:
        return self.ssh.nodes

    @property
    def stop_signal(self) -> int | None:
        return self.ssh.stop_signal


class RentalBackend(Backend):
    """SSH launch on instances this backend rents for the run and always gives back."""

    def __init__(self, provider: str, echo: bool = True, budget_usd: float | None = None,
                 deadline_s: float | None = None):
        self.name = self.provider_name = provider
        self.ssh = SshBackend(echo=echo, on_nodes_ended=self._nodes_ended)
        self.budget_usd, self.deadline_s = budget_usd, deadline_s
        self._client: Any = None
        self._previous: dict[int, Any] = {}
        self._interrupted: int | None = None  # a stop signal that came inside a provider call
        self._in_provider_call = 0
        self._fetch_lock = threading.Lock()  # the periodic sync and the final fetch write the same folders
        self._handle: RentalHandle | None = None

    def check(self) -> None:
        """SSH on PATH, and a key the provider accepts: found before the cost question and any run directory."""
        self.ssh.check()
        self.client.check_key()

    @property
    def client(self) -> Any:
        if self._client is None:
            self._client = _Guarded(fleet.client(self.provider_name, sleep=self._sleep), self)
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

    def _note(self, run: Run, msg: str) -> None:
        say(run, msg, self.ssh.out_lock)

    # -- signals: Ctrl-C, SIGTERM, SIGHUP during provisioning unwind (the finally terminates) -------------
    def _trap(self) -> None:
        """An exception raised by a signal handler in the middle of an HTTP call can leave httpx's connection
        pool locked, and the teardown's own calls then hang: inside a provider call the signal is only noted,
        and raised at the next safe point (the client's sleeps, or when the call returns). Installed for the
        whole provisioning, and put back only once the SSH launcher has its own handlers (in wait)."""
        if threading.current_thread() is not threading.main_thread():
            return

        def interrupt(signum, _frame):
            if self._in_provider_call:
                self._interrupted = signum
                return
            raise KeyboardInterrupt(signal.Signals(signum).name)

        for s in STOP_SIGNALS:
            self._previous[s] = signal.signal(s, interrupt)

    def _untrap(self) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous.clear()

    # -- limits -------------------------------------------------------------------------------------
    def limits(self, recipe: Recipe) -> tuple[float | None, float | None]:
        """(USD cap, seconds cap): the command line's, else the recipe's or profile's budget."""
        b = recipe.effective_budget
        usd = self.budget_usd if self.budget_usd is not None else b.max_cost_usd
        secs = self.deadline_s if self.deadline_s is not None else (b.max_hours * 3600 if b.max_hours else None)
        return usd, secs

    # -- launch -------------------------------------------------------------------------------------
    def launch(self, run: Run, resume_from: str | None = None, spec: LaunchSpec | None = None,
               secrets: dict[str, str] | None = None) -> RentalHandle:
        recipe = recipe_from_dict(run.recipe_dict(), run.recipe_path)
        usd, secs = self.limits(recipe)
        run.update_state(status="created", rental={"provider": self.provider_name, "budget_usd": usd,
                                                    "deadline_s": secs}, instances=run.state().get("instances") or [])
        note = lambda msg: self._note(run, msg)  # noqa: E731
        self._trap()
        try:
            key, pub = transfer.make_key(run)
            insts = provision.provision(run, recipe, self.client, pub, note, lambda: self.teardown(run, quiet=True))
            nodes = provision.nodes_for(recipe, insts, key, note)
            if len(insts) > 1 and not all(i.private_ip for i in insts):
                run.update_state(rendezvous_network="public")
            python = transfer.bootstrap(run, recipe, nodes, note)
            for n in nodes:
                n.python = python
            rdir = transfer.sync(run, recipe, nodes, resume_from, note)
            run.update_state(remote_run_dir=str(rdir))
            if usd is not None and spend(run.state().get("instances") or []) >= usd:
                raise RentalError(f"budget ${usd:.2f} already spent before training started; nothing was trained")
            ssh_handle = self.ssh.launch(run, resume_from, spec, secrets, nodes=nodes)
        except BaseException as e:
            self._untrap()
            if isinstance(e, KeyboardInterrupt):
                self._note(run, f"ftl: interrupted ({e or 'SIGINT'}) while provisioning; terminating the instances")
                run.update_state(status="stopped", ended=utcnow(), error="interrupted while provisioning")
            elif not isinstance(e, SystemExit):
                run.update_state(status="failed", ended=utcnow(), error=str(e))
            self.teardown(run)
            raise
        h = self._handle = RentalHandle(ssh_handle)
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
            return transfer.fetch_newest_checkpoint(run, nodes, lambda msg: self._note(run, msg))

    def fetch(self, run: Run, nodes: list[Node]) -> None:
        with self._fetch_lock:
            transfer.fetch(run, nodes, lambda msg: self._note(run, msg))

    def _nodes_ended(self, ssh_handle: SshHandle) -> None:
        """Before the SSH launcher's verdict: no more periodic syncs or budget checks, and the results back."""
        if self._handle is not None and self._handle.ssh is ssh_handle:
            self._handle.done.set()
        self.fetch(ssh_handle.run, ssh_handle.nodes)

    # -- watch --------------------------------------------------------------------------------------
    def _guard(self, h: RentalHandle, usd: float | None, secs: float | None) -> None:
        """Stop the run (SIGTERM: checkpoint) when the spend or the elapsed time reaches its cap."""
        while not h.done.wait(BUDGET_POLL_S):
            insts = h.run.state().get("instances") or []
            cost = spend(insts)
            starts = [s for s in (iso_epoch(i.get("created_at")) for i in insts) if s]
            elapsed = time.time() - min(starts) if starts else 0.0
            why = None
            if usd is not None and cost >= usd:
                why = f"budget reached: ${cost:.2f} of ${usd:.2f}"
            elif secs is not None and elapsed >= secs:
                why = f"deadline reached: {elapsed / 3600:.2f} h of {secs / 3600:.2f} h"
            if why and h.ssh.stop_signal is None:
                h.budget_hit = why
                h.ssh.stop_signal = signal.SIGTERM
                h.run.update_state(stop_requested=utcnow(), budget_stop=why)
                self.ssh.say(h.ssh, f"ftl: {why}; asking every node to save a checkpoint and stop")
                self.ssh.signal_all(h.ssh, signal.SIGTERM)
                return

    def wait(self, handle: RentalHandle) -> str:
        try:
            status = self.ssh.wait(handle.ssh)
            if handle.budget_hit:
                handle.run.update_state(error=handle.budget_hit)
            return status
        finally:
            handle.done.set()
            self._untrap()
            self.teardown(handle.run)
            try:  # cost.json again, now that every instance has its termination time
                write_cost(handle.run)
            except Exception:  # noqa: BLE001 - a report never fails a run
                pass

    # -- tear down ----------------------------------------------------------------------------------
    def teardown(self, run: Run, quiet: bool = False) -> list[str]:
        """Terminate every instance of the run (recorded ones, and any the provider lists under its names)."""
        old = {s: signal.signal(s, signal.SIG_IGN) for s in STOP_SIGNALS} \
            if threading.current_thread() is threading.main_thread() else {}
        try:
            self._interrupted = None  # nothing may interrupt the teardown's own calls
            td = fleet.terminate_run(run, self._client._provider if self._client is not None else None)
        finally:
            for s, h in old.items():
                signal.signal(s, h)
        if td.done and not quiet:
            self._note(run, f"ftl: terminated {len(td.done)} instance(s): {', '.join(td.done)}; spent about "
                            f"${spend(run.state().get('instances') or []):.2f}")
        if td.failed:  # only what was created can fail to terminate
            self._note(run, "ftl: COULD NOT TERMINATE: " + "; ".join(td.failed) + f" (retry: ftl down {run.id})")
        elif td.unqueried:
            self._note(run, f"ftl: could not check {td.provider} for instances named after the run ({td.unqueried}); "
                            f"check with: ftl down {run.id}")
        return td.done

    # -- other verbs ------------------------------------------------------------------------------
    def status(self, run: Run) -> dict[str, Any]:
        st = run.state()
        if st.get("status") in ACTIVE and not pid_alive(st.get("launcher_pid")) and st.get("instances"):
            alive = [i for i in st["instances"] if not i.get("terminated_at")]
            if alive and not st.get("hosts"):
                return st
        return self.ssh.status(run)

    def cancel(self, run: Run) -> bool:
        return self.ssh.cancel(run)

    def logs(self, run: Run, follow: bool = False, rank: int | None = None) -> Iterator[str]:
        return self.ssh.logs(run, follow, rank)

    def log_path(self, run: Run, rank: int | None = None) -> Path:
        return self.ssh.log_path(run, rank)

    def where(self, state: dict[str, Any]) -> str:
        insts = state.get("instances") or []
        if not insts:
            return self.ssh.where(state)
        live = [i for i in insts if not i.get("terminated_at")]
        what = f"{len(live)} {insts[0].get('provider')} instance(s)" if live else "instances terminated"
        return f"{what}, ${spend(insts):.2f}"


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


__all__ = ["RentalBackend", "RentalError", "RentalHandle", "instance_name", "sync_every_s"]
