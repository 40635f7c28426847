"""Rented instances across runs: terminating a run's, finding and cleaning up orphans (`ftl down`), listing the
live ones with their running cost (`ftl ps`), and saving a run whose ftl died before its instances go.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass
from typing import Any

from launcher.backends.rental import transfer
from launcher.backends.base import say
from launcher.backends.ssh import SshBackend, SshHandle, stop_grace_s
from launcher.cloud import AuthError, Instance, ProviderError, get_provider
from launcher.cloud.credentials import api_key
from launcher.core.errors import FtlError
from launcher.core.files import iso_epoch, utcnow
from launcher.core.procs import pid_alive
from launcher.rundir import ACTIVE, Run, list_runs
from launcher.spec.recipe import RENTED


def provider_options(provider: str) -> dict[str, Any]:
    """Client options; env overrides exist for tests and impatient users (poll period, Lambda's launch pace)."""
    opts: dict[str, Any] = {}
    poll = os.environ.get("FTL_PROVIDER_POLL_S")
    if poll:
        opts["poll_s"] = float(poll)
    pace = os.environ.get("FTL_LAMBDA_LAUNCH_INTERVAL_S")
    if provider == "lambda" and pace:
        opts["launch_interval_s"] = float(pace)
    every = os.environ.get("FTL_LAMBDA_REQUEST_INTERVAL_S")
    if provider == "lambda" and every:
        opts["request_interval_s"] = float(every)
    return opts


def client(provider: str, **options: Any) -> Any:
    return get_provider(provider, **{**provider_options(provider), **options})


def _rank_suffix(name: str, run_id: str) -> bool:
    head = f"ftl-{run_id}-"
    return name.startswith(head) and name[len(head):].isdigit()


@dataclass
class Teardown:
    """What terminating a run's instances came to: names terminated, instances that could not be, and why the
    provider could not be asked for instances named after the run (no key, refused key, unreachable)."""

    provider: str | None
    done: list[str]
    failed: list[str]
    unqueried: str | None = None


def terminate_run(run: Run, prov: Any = None) -> Teardown:
    """Terminate the run's instances: recorded ids, plus anything the provider lists under the run's names."""
    st = run.state()
    name = (st.get("rental") or {}).get("provider") or st.get("backend")
    if name not in RENTED:
        return Teardown(None, [], [])
    rows = list(st.get("instances") or [])
    ids = {r["id"]: r for r in rows if not r.get("terminated_at")}
    try:
        prov = prov or client(name)
    except ProviderError as e:
        return Teardown(name, [], [f"{r.get('name') or iid}: {e}" for iid, r in ids.items()], str(e))
    failed: list[str] = []
    unqueried = None
    try:
        named = [i for i in prov.list(prefix=f"ftl-{run.id}-") if _rank_suffix(i.name, run.id)]
        for inst in named + prov.find(f"ftl-{run.id}"):  # find: also the members of the cluster of that name
            if inst.id not in ids:
                ids[inst.id] = {"id": inst.id, "name": inst.name}
    except ProviderError as e:
        unqueried = f"listing instances: {e}"
    done: list[str] = []
    for iid, row in ids.items():
        try:
            prov.terminate(iid)
            done.append(str(row.get("name") or iid))
            row["terminated_at"] = utcnow()
        except ProviderError as e:
            failed.append(f"{row.get('name') or iid}: {e}")
    if done:
        for r in rows:
            if r["id"] in ids and ids[r["id"]].get("terminated_at"):
                r["terminated_at"] = ids[r["id"]]["terminated_at"]
                r["status"] = "terminated"
        run.update_state(instances=rows)
    if not failed and unqueried is None:
        key = run.dir / "ssh" / "id_ed25519"
        if key.exists() and not any(not r.get("terminated_at") for r in rows):
            key.unlink()  # useless now; a private key left on disk is only a risk
    return Teardown(name, done, failed, unqueried)


def salvage(run: Run) -> bool:
    """A run whose ftl died while its nodes train on: ask every node to save a checkpoint and stop, wait (at
    most FTL_STOP_GRACE_S), and fetch what they have, so that terminating loses nothing `ftl launch --resume`
    needs. False when there is nothing to reach (no hosts recorded, or the run's key is gone)."""
    st = run.state()
    provider = (st.get("rental") or {}).get("provider") or st.get("backend")
    if provider not in RENTED or not st.get("hosts") or not st.get("remote_run_dir") \
            or not (run.dir / "ssh" / "id_ed25519").is_file():
        return False
    ssh = SshBackend(echo=False)
    h = SshHandle(run, ssh.recorded_nodes(run))
    ssh.say(h, f"ftl: run {run.id}: its ftl is gone; asking every node to save a checkpoint and stop before terminating")
    run.update_state(stop_requested=utcnow())
    ssh.signal_all(h, signal.SIGTERM)
    deadline = time.monotonic() + stop_grace_s()
    while time.monotonic() < deadline and any(ssh.probe(run, n) == "alive" for n in h.nodes):
        time.sleep(1.0)
    transfer.fetch(run, h.nodes, lambda msg: say(run, msg, ssh.out_lock))
    return True


def live_run(run: Run) -> bool:
    st = run.state()
    return st.get("status") in ACTIVE and pid_alive(st.get("launcher_pid"))


def configured() -> list[str]:
    """The rental providers with an API key configured."""
    return [name for name in RENTED if key_problem(name) is None]


def key_problem(provider: str) -> str | None:
    """Why a launch at `provider` would stop before renting (no API key configured), for --dry-run; None when
    a key is configured (whether the provider accepts it is asked at launch)."""
    try:
        api_key(provider)
    except AuthError as e:
        return f"no {e.env_var}: a real launch would stop here ({e})"
    return None


def owner(inst: Instance, runs: list[Run]) -> Run | None:
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


def rented_instances(providers: list[str] | None = None) -> list[tuple[Instance, Run | None]]:
    """(instance, owning run or None) for every live ftl-* instance at each configured provider."""
    runs = list_runs()
    out = []
    for name in providers if providers is not None else configured():
        for inst in client(name).list(prefix="ftl-"):
            out.append((inst, owner(inst, runs)))
    return out


@dataclass
class RentedRow:
    """One live rented instance as `ftl ps` shows it."""

    provider: str
    name: str
    status: str
    run_id: str | None  # None: an orphan
    run_alive: bool  # the owning run's ftl is still running
    price_per_hour: float | None
    running_cost_usd: float | None


def rented_rows(now: float | None = None) -> list[RentedRow]:
    """The live ftl-* instances at every provider with a key configured, with their owner and running cost."""
    names = configured()
    now = time.time() if now is None else now
    rows = []
    for inst, run in (rented_instances(names) if names else []):
        rec = next((i for i in (run.state().get("instances") or []) if i.get("id") == inst.id), {}) if run else {}
        start = iso_epoch(rec.get("created_at") or inst.created_at)
        price = inst.price_per_hour or rec.get("price_per_hour")
        cost = price * (now - start) / 3600 if price and start else None
        rows.append(RentedRow(inst.provider, inst.name, inst.status, run.id if run else None,
                              bool(run is not None and live_run(run)), price, cost))
    return rows


def down_orphans(providers: list[str] | None = None) -> tuple[list[Instance], list[str], dict[str, str]]:
    """Terminate the live ftl-* instances that belong to no live run, at each of `providers` (default: every
    rental provider). ([terminated], [errors], {provider that could not be asked: why}): a provider
    without a key or refusing it is named, never taken for one without orphans."""
    runs = list_runs()
    found: list[Instance] = []
    unqueried: dict[str, str] = {}
    clients: dict[str, Any] = {}  # one per provider: its pace and retries cover every call
    for name in providers if providers is not None else list(RENTED):
        try:
            clients[name] = client(name)
            insts = clients[name].list(prefix="ftl-")
        except ProviderError as e:
            unqueried[name] = str(e)
            continue
        found += [i for i in insts if (r := owner(i, runs)) is None or not live_run(r)]
    errors = []
    for r in {id(r): r for r in (owner(i, runs) for i in found) if r is not None}.values():
        try:
            salvage(r)
        except (FtlError, OSError) as e:
            errors.append(f"run {r.id}: could not save its results before terminating: {e}")
    gone = []
    for inst in found:
        try:
            clients[inst.provider].terminate(inst.id)
        except ProviderError as e:
            errors.append(f"{inst.name} ({inst.id}): {e}")
            continue
        gone.append(inst)
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
    return gone, errors, unqueried


def down_run(run: Run) -> Teardown:
    """`ftl down RUN`: save a run whose ftl is gone, then terminate its instances."""
    if not live_run(run):
        salvage(run)
    return terminate_run(run)
