"""Renting the instances of a run: the cheapest available offer, instances named after the run, each recorded in
state.json the moment the provider answers (what `ftl down` works from, even after a kill -9), ready for SSH.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from launcher.backends.rental.transfer import RentalError
from launcher.backends.ssh import Node
from launcher.cloud import Instance, NoCapacity, Offer, ProviderError, ProviderTimeout
from launcher.core.files import utcnow
from launcher.rundir import Run
from launcher.spec.recipe import Recipe

READY_TIMEOUT_S = 900.0  # Lambda documents up to 15 min for some types

Note = Callable[[str], None]


def instance_name(run_id: str, rank: int) -> str:
    return f"ftl-{run_id}-{rank}"


def env_float(name: str, default: float | None) -> float | None:
    v = os.environ.get(name)
    return float(v) if v else default


def provision(run: Run, recipe: Recipe, prov: Any, public_key: str, note: Note,
              teardown: Callable[[], Any]) -> list[Instance]:
    """Create the instances (the next offer when one is not placed: no capacity, or RunPod's 400/403, tearing
    down what the failed offer left), record each at once, wait until every one is ready."""
    cl = recipe.cluster
    offers = [o for o in prov.offers(cl.gpu, cl.gpus_per_node, cluster=cl.nodes > 1) if o.available
              and (not cl.region or o.region == cl.region)
              and (not cl.cloud_type or o.cloud_type in (None, cl.cloud_type.upper()))]
    what = f"{cl.gpus_per_node}x {cl.gpu or 'any GPU'}" + (f" in {cl.region}" if cl.region else "")
    name = prov.name
    unreachable = [o for o in offers if not o.public_ip and (o.cloud_type or "").lower() != (cl.cloud_type or "")]
    if unreachable:  # ftl reaches its nodes by direct SSH: an instance with no public address never gets there
        tiers = sorted({o.cloud_type or "?" for o in unreachable})
        note(f"ftl: skipping {len(unreachable)} {'/'.join(tiers)} offer(s) on {name}: they may get no public IP "
             f"and ftl needs direct SSH (set cloud_type: {tiers[0].lower()} in the profile to try them anyway)")
        offers = [o for o in offers if o not in unreachable]
    if not offers:
        raise RentalError(f"{name}: no offer with capacity for {what} now; try another GPU, "
                          "region or provider (ftl prices --refresh lists them)")
    env = {"FTL_RUN_ID": run.id}
    tried: list[str] = []
    uncoded_400s = 0  # answers that are only "400" with a human text: capacity, or a rule the request breaks
    for offer in offers:
        where = f"{offer.gpus}x {offer.gpu_type} {offer.region or ''} at ${offer.price_per_hour:g}/h".strip()
        note(f"ftl: renting {cl.nodes} x {where} on {name}")
        try:
            insts = _create(run, recipe, prov, offer, public_key, env)
        except NoCapacity as e:
            tried.append(f"{where}: {e}")
            uncoded_400s += e.status == 400 and e.code is None
            note(f"ftl: {where} not placed ({e.status or 'no capacity'}); trying the next offer" if offer is not offers[-1]
                 else f"ftl: {where} not placed ({e.status or 'no capacity'})")
            teardown()
            continue
        break
    else:
        hint = ("; every offer answered 400 without a code, which may mean the request itself breaks a rule (RunPod's "
                "document: read the last answer as a problem with the request)" if uncoded_400s == len(tried) > 1 else "")
        raise RentalError(f"{name}: no capacity for {what}; tried {len(tried)} offer(s): " + "; ".join(tried) + hint)
    timeout = env_float("FTL_PROVIDER_READY_TIMEOUT_S", READY_TIMEOUT_S) or READY_TIMEOUT_S
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
        record(run, got)
    note("ftl: ready: " + ", ".join(f"{i.name} ({i.ssh_user}@{i.ssh_host}:{i.ssh_port})" for i in ready))
    return sorted(ready, key=lambda i: i.rank or 0)


def _create(run: Run, recipe: Recipe, prov: Any, offer: Offer, public_key: str, env: dict[str, str]) -> list[Instance]:
    cl = recipe.cluster
    image = cl.image
    if cl.nodes > 1 and prov.name == "runpod":  # one Instant Cluster: ranks and a private network
        name = f"ftl-{run.id}"
        run.update_state(cluster_name=name)
        members = prov.create_cluster(name, offer, cl.nodes, public_key, image=image, env=env)
        for m in members:
            record(run, m)
        return members
    out = []
    for rank in range(cl.nodes):
        inst = prov.create(instance_name(run.id, rank), offer, public_key, image=image, env=env)
        inst.rank = rank
        record(run, inst)
        out.append(inst)
    return out


def record(run: Run, inst: Instance) -> None:
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


def nodes_for(recipe: Recipe, insts: list[Instance], key: Path, note: Note | None = None) -> list[Node]:
    """SSH nodes for the instances; FTL_RENTAL_SSH_USER replaces the provider's login user (root on RunPod,
    ubuntu on Lambda) for images that use another one. Ranks meet on the private addresses; an instance
    without one (Lambda's `private_ip` is optional) makes every rank meet on the public ones, said aloud,
    since the inter-node traffic then takes the public network the estimate did not assume."""
    user = os.environ.get("FTL_RENTAL_SSH_USER")
    missing = [i.name for i in insts if not i.private_ip]
    public = len(insts) > 1 and bool(missing)
    if public and note is not None:
        note(f"ftl: {', '.join(missing)} reported no private address: the ranks meet on public addresses, and "
             "inter-node traffic goes over the public network (slower than the profile's inter_node_bandwidth_gbps "
             "the estimate used)")
    return [Node(rank=r, host=str(i.ssh_host), port=int(i.ssh_port or 22), user=user or i.ssh_user, key=str(key),
                 address=str(i.ssh_host) if public or not i.private_ip else i.private_ip, python=recipe.cluster.python)
            for r, i in enumerate(insts)]
