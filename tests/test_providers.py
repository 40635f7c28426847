"""Provider clients (launcher/providers) against the local fakes in tests/fake_providers.py (127.0.0.1 only)."""

from __future__ import annotations

import base64
import logging
import os
import re
import time
from pathlib import Path

import httpx
import pytest
import yaml

from fake_providers import (LAMBDA_KEY, RUNPOD_KEY, RUNPOD_NO_CAPACITY_WORDINGS, FakeRunPod,  # noqa: F401 (fixtures)
                            fake_lambda, fake_runpod)
from launcher.cloud import AuthError, NoCapacity, Offer, ProviderError, ProviderTimeout, get_provider
from launcher import rundir as R
from launcher.backends.rental.provision import nodes_for, provision
from launcher.backends.rental.transfer import RentalError
from launcher.cloud.http import JsonClient
from launcher.core.files import iso_epoch
from launcher.rundir.cost import spend
from launcher.spec.recipe import load_recipe
from tests.openapi_check import document

SMOKE = Path(__file__).resolve().parent.parent / "recipes" / "smoke.yaml"
PUB = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFakeFakeFakeFakeFakeFakeFakeFakeFakeFake ftl@test"


class Clock:
    """Fake time: sleep() advances it and records the wait, so polling and backoff cost nothing."""

    def __init__(self):
        self.now, self.sleeps = 1000.0, []

    def sleep(self, s: float) -> None:
        self.sleeps.append(s)
        self.now += s

    def clock(self) -> float:
        return self.now


@pytest.fixture
def clock():
    return Clock()


def provider(name: str, clock: Clock, **kw):
    """A client on the fake clock; Lambda's 1 request/s pace off unless a test asks for it (it has its own test)."""
    if name == "lambda":
        kw.setdefault("request_interval_s", 0.0)
    return get_provider(name, sleep=clock.sleep, clock=clock.clock, poll_s=1.0, rng=lambda: 0.5, **kw)


def _reqs(fake, method: str, prefix: str) -> list[dict]:
    return [r for r in fake.requests if r["method"] == method and r["path"].startswith(prefix)]


RP_H100 = Offer("runpod", "h100-sxm", "NVIDIA H100 80GB HBM3", 1, 2.99, "US-TX-3", True, "SECURE")
LM_H100 = Offer("lambda", "h100-pcie", "gpu_1x_h100_pcie", 1, 2.49, "us-west-1", True)
LM_8XH100 = Offer("lambda", "h100-sxm", "gpu_8x_h100_sxm5", 8, 23.92, "us-south-1", True)


# --- offers ----------------------------------------------------------------------------------------


def test_runpod_offers_map_catalog_names_prices_and_regions(fake_runpod, clock):
    p = provider("runpod", clock)
    h = p.offers("h100-sxm")
    # EU-RO-1 has none now: the catalog lists only the data centers that offer it (the document's GpuType)
    assert {(o.cloud_type, o.region, o.available) for o in h} == {("SECURE", "US-TX-3", True),
                                                                  ("COMMUNITY", "US-TX-3", True)}
    assert all(o.gpu == "h100-sxm" and o.gpu_type == "NVIDIA H100 80GB HBM3" for o in h)
    assert h[0] == Offer("runpod", "h100-sxm", "NVIDIA H100 80GB HBM3", 1, 2.49, "US-TX-3", True, "COMMUNITY",
                         public_ip=False)  # a community pod may get no public IP
    assert p.offers("NVIDIA H100 80GB HBM3") == h  # the provider's id works too
    q = _reqs(fake_runpod, "GET", "/v2/catalog/gpus")[0]["query"]
    assert "include=AVAILABILITY" in q and "product=POD" in q
    every = p.offers()
    assert {o.gpu for o in every if o.gpu_type == "NVIDIA RTX PRO 6000 Blackwell"} == {None}  # not in the catalog
    eight = p.offers("rtx-4090", gpus=8)  # community maxCount is 4
    assert [(o.cloud_type, o.price_per_hour) for o in eight] == [("SECURE", 3.52)]
    assert not fake_runpod.crashes


def test_runpod_cluster_offers_read_cluster_stock_and_are_secure_only(fake_runpod, clock):
    """Instant Cluster stock is its own (product=CLUSTER), and the cluster create carries no cloud tier: cluster
    offers are SECURE ones at the SECURE price, never a COMMUNITY offer the create would rent as SECURE."""
    fake_runpod.cluster_gpus = {"NVIDIA GeForce RTX 4090"}
    p = provider("runpod", clock)
    got = p.offers("rtx-4090", gpus=2, cluster=True)
    assert [(o.cloud_type, o.price_per_hour, o.region, o.available) for o in got] == [("SECURE", 0.88, "US-KS-2", True)]
    qs = [r["query"] for r in _reqs(fake_runpod, "GET", "/v2/catalog/gpus")]
    assert len(qs) == 1 and "product=CLUSTER" in qs[0] and "cloud=SECURE" in qs[0]
    assert not [o for o in p.offers("h100-sxm", cluster=True) if o.available]  # pods have it, clusters do not
    assert [o for o in p.offers("h100-sxm") if o.available]


def test_runpod_pod_asks_for_the_images_cuda_and_cluster_nodes_get_the_nccl_interface(fake_runpod, clock):
    p = provider("runpod", clock)
    p.create("ftl-cu-0", RP_H100, PUB)  # the default image: runpod/pytorch:...-cu1281-...
    p.create("ftl-cu-1", RP_H100, PUB, image="runpod/pytorch:2.4.0-py3.11-cuda12.4.1-devel-ubuntu22.04")
    p.create("ftl-cu-2", RP_H100, PUB, image="ubuntu:24.04")  # says nothing about CUDA: no constraint
    gpus = [r["json"]["gpu"] for r in _reqs(fake_runpod, "POST", "/v2/pods")]
    assert [g.get("minCudaVersion") for g in gpus] == ["12.8", "12.4", None]
    p.create_cluster("ftl-nc", RP_H100, 2, PUB)
    p.create_cluster("ftl-nc2", RP_H100, 2, PUB, env={"NCCL_SOCKET_IFNAME": "ens2"})  # the profile's env wins
    envs = [r["json"]["env"] for r in _reqs(fake_runpod, "POST", "/v2/clusters")]
    assert [e["NCCL_SOCKET_IFNAME"] for e in envs] == ["ens1", "ens2"]
    for i in fake_runpod.running():
        p.terminate(i["id"])


def test_runpod_reaches_pods_on_any_image_through_its_own_sshd_start(fake_runpod, clock):
    """RunPod starts sshd from PUBLIC_KEY only in images that honour its convention (its own): other images get
    ftl's start-up as the documented `args`; RunPod's own keep their start-up."""
    made = []
    fake_runpod.on_create = lambda pod: made.append(pod["image"]) or {}
    p = provider("runpod", clock)
    p.create("ftl-img-0", RP_H100, PUB)
    p.create("ftl-img-1", RP_H100, PUB, image="nvidia/cuda:12.8.1-cudnn-devel-ubuntu24.04")
    bodies = [r["json"] for r in _reqs(fake_runpod, "POST", "/v2/pods")]
    assert "args" not in bodies[0]
    assert "sshd" in bodies[1]["args"] and "$PUBLIC_KEY" in bodies[1]["args"] and "authorized_keys" in bodies[1]["args"]
    assert bodies[1]["gpu"]["minCudaVersion"] == "12.8"
    assert len(made) == 2 and fake_runpod.unreachable == []  # both started sshd
    for i in fake_runpod.running():
        p.terminate(i["id"])


def test_lambda_offers_cents_per_instance_and_capacity(fake_lambda, clock):
    p = provider("lambda", clock)
    one = p.offers()
    by = {(o.gpu_type, o.region): o for o in one}
    assert by[("gpu_1x_h100_pcie", "us-west-1")] == LM_H100
    assert by[("gpu_1x_h100_pcie", "us-east-1")].available
    assert by[("gpu_1x_a100_sxm4", None)].available is False and by[("gpu_1x_a100_sxm4", None)].gpu == "a100-40gb"
    assert by[("gpu_1x_gh200", "us-east-1")].gpu is None
    assert not any(o.gpu_type.startswith("cpu") for o in one)
    assert one[-1].gpu_type == "gpu_1x_a100_sxm4"  # unavailable last
    assert p.offers("h100-sxm", gpus=8) == [LM_8XH100]
    assert p.offers("h100-pcie") == [o for o in one if o.gpu == "h100-pcie"]


# --- create, wait, list, terminate -----------------------------------------------------------------


def test_runpod_create_wait_ready_list_terminate(fake_runpod, clock):
    fake_runpod.on_create = lambda pod: {"ssh_host": "127.0.0.1", "ssh_port": 2222}
    p = provider("runpod", clock)
    inst = p.create("ftl-abc-0", RP_H100, PUB, env={"FTL_RUN": "abc"}, disk_gb=80)
    assert (inst.status, inst.raw_status, inst.name, inst.ssh_host) == ("pending", "PROVISIONING", "ftl-abc-0", None)
    body = _reqs(fake_runpod, "POST", "/v2/pods")[0]["json"]
    assert body["env"]["PUBLIC_KEY"] == PUB and body["env"]["FTL_RUN"] == "abc" and "22/tcp" in body["ports"]
    assert body["gpu"] == {"id": "NVIDIA H100 80GB HBM3", "count": 1, "minCudaVersion": "12.8"} and body["dataCenterIds"] == ["US-TX-3"]
    assert body["disk"] == 80 and body["cloud"] == "SECURE"
    ready = p.wait_ready(inst.id, timeout_s=60)
    assert (ready.status, ready.ssh_host, ready.ssh_port, ready.ssh_user) == ("running", "127.0.0.1", 2222, "root")
    assert ready.price_per_hour == 2.99 and ready.gpus == 1 and ready.created_at and ready.region == "US-TX-3"
    other = p.create("someone-else", RP_H100, PUB)
    assert [i.id for i in p.list()] == [inst.id]
    assert [i.id for i in p.find("ftl-abc-0")] == [inst.id] and p.find("ftl-abc") == []
    p.terminate(inst.id)
    p.terminate(inst.id)  # already gone: fine
    assert p.get(inst.id) is None and p.list() == []
    assert [i["id"] for i in fake_runpod.running()] == [other.id]
    assert not fake_runpod.crashes


def test_runpod_terminated_status_is_normalized(fake_runpod, clock):
    fake_runpod.keep_terminated = True
    p = provider("runpod", clock)
    inst = p.create("ftl-t-0", RP_H100, PUB)
    p.terminate(inst.id)
    got = p.get(inst.id)
    assert (got.status, got.raw_status) == ("terminated", "TERMINATED")
    p.terminate(inst.id)


def test_lambda_create_wait_ready_list_terminate(fake_lambda, clock):
    fake_lambda.on_create = lambda d: {"ssh_host": "127.0.0.5", "private_ip": "10.0.2.7"}
    p = provider("lambda", clock)
    inst = p.create("ftl-xyz-0", LM_H100, PUB, image="lambda-stack-22-04", env={"FTL_RUN": "xyz 1"})
    assert (inst.status, inst.raw_status, inst.ssh_host, inst.ssh_user) == ("pending", "booting", None, "ubuntu")
    launch = _reqs(fake_lambda, "POST", "/api/v1/instance-operations/launch")[0]["json"]
    assert launch["name"] == "ftl-xyz-0" and launch["region_name"] == "us-west-1" and "quantity" not in launch
    assert launch["image"] == {"family": "lambda-stack-22-04"} and "FTL_RUN='xyz 1'" in launch["user_data"]
    assert len(launch["ssh_key_names"]) == 1 and fake_lambda.ssh_keys[0]["public_key"] == PUB
    ready = p.wait_ready(inst.id, timeout_s=60)
    assert (ready.status, ready.ssh_host, ready.ssh_port, ready.private_ip) == ("running", "127.0.0.5", 22, "10.0.2.7")
    assert ready.price_per_hour == 2.49 and ready.gpus == 1 and ready.region == "us-west-1"
    # a second instance reuses the registered key (matched by key material, not comment)
    other = p.create("not-ours", LM_H100, PUB.rsplit(" ", 1)[0] + " other-comment")
    assert len(_reqs(fake_lambda, "POST", "/api/v1/ssh-keys")) == 1
    assert [i.id for i in p.list()] == [inst.id] and [i.id for i in p.find("ftl-xyz-0")] == [inst.id]
    p.terminate(inst.id)
    p.terminate(inst.id)
    assert p.get(inst.id) is None and p.list() == []
    assert [i["id"] for i in fake_lambda.running()] == [other.id]
    assert not fake_lambda.crashes


# --- multi-node ------------------------------------------------------------------------------------


def test_runpod_cluster_ranks_private_ips_and_whole_cluster_terminate(fake_runpod, clock):
    ips = iter(["10.65.0.2", "10.65.0.3"])
    ports = iter([2201, 2202])
    fake_runpod.on_create = lambda pod: {"private_ip": next(ips), "ssh_port": next(ports)}
    p = provider("runpod", clock)
    nodes = p.create_cluster("ftl-c1", RP_H100, 2, PUB)
    assert [(n.rank, n.private_ip) for n in nodes] == [(0, "10.65.0.2"), (1, "10.65.0.3")]
    assert all(n.cluster_id == nodes[0].cluster_id for n in nodes)
    body = _reqs(fake_runpod, "POST", "/v2/clusters")[0]["json"]
    assert body["compute"] == {"gpuTypeId": "NVIDIA H100 80GB HBM3", "gpuCountPerPod": 1, "podCount": 2}
    assert body["type"] == "TRAINING" and body["env"]["PUBLIC_KEY"] == PUB
    ready = [p.wait_ready(n.id, timeout_s=60) for n in nodes]
    assert [(r.rank, r.ssh_port, r.private_ip) for r in ready] == [(0, 2201, "10.65.0.2"), (1, 2202, "10.65.0.3")]
    env = fake_runpod.running()[1]["env"]
    assert env["NODE_RANK"] == "1" and env["MASTER_ADDR"] == "10.65.0.2" and env["WORLD_SIZE"] == "2"
    # member pods carry RunPod's names; ours are found through the cluster's name
    assert not any(n.name.startswith("ftl-") for n in nodes)
    assert sorted(i.id for i in p.list()) == sorted(n.id for n in nodes)
    assert len(p.find("ftl-c1")) == 2
    p.terminate(nodes[1].id)  # a member: RunPod answers 409, so the cluster goes
    assert fake_runpod.running() == [] and p.list() == []
    p.terminate(nodes[0].id)


def test_lambda_cluster_launches_one_by_one_ranked_and_paced(fake_lambda, clock):
    ips = iter(["10.0.0.10", "10.0.0.11", "10.0.0.12"])
    fake_lambda.on_create = lambda d: {"private_ip": next(ips)}
    p = provider("lambda", clock)
    nodes = p.create_cluster("ftl-c2", LM_8XH100, 3, PUB)
    assert [(n.name, n.rank) for n in nodes] == [("ftl-c2-0", 0), ("ftl-c2-1", 1), ("ftl-c2-2", 2)]
    launches = _reqs(fake_lambda, "POST", "/api/v1/instance-operations/launch")
    assert len(launches) == 3 and all("quantity" not in r["json"] for r in launches)
    assert clock.sleeps.count(12.0) == 2  # Lambda's one launch per 12 s
    ready = [p.wait_ready(n.id, timeout_s=60) for n in nodes]
    assert [(r.rank, r.private_ip) for r in ready] == [(0, "10.0.0.10"), (1, "10.0.0.11"), (2, "10.0.0.12")]
    assert sorted(i.rank for i in p.list("ftl-c2-")) == [0, 1, 2]  # rank survives in a tag


def test_lambda_cluster_is_all_or_nothing(fake_lambda, clock):
    made = []

    def hook(d):
        made.append(d["id"])
        if len(made) == 2:
            fake_lambda.no_capacity = True

    fake_lambda.on_create = hook
    p = provider("lambda", clock)
    with pytest.raises(NoCapacity, match="Not enough capacity"):
        p.create_cluster("ftl-c3", LM_H100, 3, PUB)
    assert fake_lambda.running() == []


# --- retries and errors ----------------------------------------------------------------------------


def test_500_and_429_are_retried_with_backoff_and_retry_after(fake_runpod, fake_lambda, clock):
    rp, lm = provider("runpod", clock), provider("lambda", clock)
    fake_runpod.fail_next(500, n=2, path_prefix="/v2/pods")
    assert rp.list() == []
    assert len(_reqs(fake_runpod, "GET", "/v2/pods")) == 3
    assert clock.sleeps == [1.0, 2.0]  # backoff 1 s doubling (jitter pinned by rng)
    clock.sleeps.clear()
    fake_lambda.fail_next(429, n=2, path_prefix="/api/v1/instances", retry_after=7)
    assert lm.list() == []
    assert len(_reqs(fake_lambda, "GET", "/api/v1/instances")) == 3 and clock.sleeps == [7.0, 7.0]
    fake_lambda.fail_next(503, n=4)
    with pytest.raises(ProviderError, match="after 4 attempts.*HTTP 503") as e:
        lm.offers()
    assert e.value.status == 503


def test_lambda_is_paced_at_its_documented_rate(fake_lambda, clock):
    """Lambda documents 1 request/s (and one launch per 12 s): calls wait for their slot on the client's clock."""
    lm = get_provider("lambda", sleep=clock.sleep, clock=clock.clock, poll_s=1.0, rng=lambda: 0.5)
    lm.list()
    lm.list()
    lm.offers()
    assert clock.sleeps == [1.0, 1.0]
    clock.now += 5  # time passed between calls: no wait
    lm.list()
    assert clock.sleeps == [1.0, 1.0]


@pytest.mark.parametrize("form", ["documented body, no Retry-After", "no body at all", "Retry-After 3"])
def test_lambda_429_without_retry_after_waits_a_launch_window(fake_lambda, clock, form):
    """Lambda's document gives no 429 body and no Retry-After: without one the client waits >= 12 s (the launch
    window), so three 429s in a row no longer give up within ~10 s; a Retry-After, when one comes, is used."""
    lm = provider("lambda", clock)
    fake_lambda.fail_next(429, n=3, path_prefix="/api/v1/instances", empty=form == "no body at all",
                          retry_after=3 if form == "Retry-After 3" else None)
    assert lm.list() == []
    assert clock.sleeps == ([3.0] * 3 if form == "Retry-After 3" else [12.0] * 3)


def test_create_post_is_not_repeated_blindly_after_a_5xx(fake_runpod, clock):
    p = provider("runpod", clock)
    fake_runpod.fail_next(502, path_prefix="/v2/pods")
    inst = p.create("ftl-r-0", RP_H100, PUB)  # 502 (nothing made), looked up, created once
    assert len(_reqs(fake_runpod, "POST", "/v2/pods")) == 2 and len(fake_runpod.running()) == 1
    calls = []

    def crash_once(pod):  # the pod is made, then the server fails: RunPod's billed-behind-a-5xx case
        calls.append(pod)
        if len(calls) == 1:
            raise RuntimeError("boom")

    fake_runpod.on_create = crash_once
    again = p.create("ftl-r-1", RP_H100, PUB)
    assert len(_reqs(fake_runpod, "POST", "/v2/pods")) == 3  # not posted twice
    assert sorted(i["name"] for i in fake_runpod.running()) == ["ftl-r-0", "ftl-r-1"] and again.name == "ftl-r-1"
    assert inst.name == "ftl-r-0"


def test_429_on_create_is_retried(fake_lambda, clock):
    p = provider("lambda", clock)
    fake_lambda.fail_next(429, path_prefix="/api/v1/instance-operations/launch", retry_after=3)
    p.create("ftl-q-0", LM_H100, PUB)
    assert len(_reqs(fake_lambda, "POST", "/api/v1/instance-operations/launch")) == 2 and 3.0 in clock.sleeps


def test_other_4xx_are_not_retried_and_show_the_providers_message(fake_runpod, fake_lambda, clock):
    rp, lm = provider("runpod", clock), provider("lambda", clock)
    fake_runpod.fail_next(403, path_prefix="/v2/pods", message="access denied")
    with pytest.raises(ProviderError, match="HTTP 403: access denied.*RUNPOD_API_KEY") as e:
        rp.get("abc")
    assert e.value.status == 403 and len(_reqs(fake_runpod, "GET", "/v2/pods")) == 1
    bogus = Offer("runpod", None, "NVIDIA Imaginary 1", 1, 1.0, None, True, "SECURE")
    with pytest.raises(NoCapacity, match="unknown gpu type id") as e:  # a 400: RunPod says try the next candidate
        rp.create("ftl-b-0", bogus, PUB)
    assert e.value.status == 400 and len(_reqs(fake_runpod, "POST", "/v2/pods")) == 1
    fake_runpod.fail_next(402, path_prefix="/v2/pods", method="POST", message="insufficient balance")
    with pytest.raises(ProviderError, match="insufficient balance") as e:  # no candidate will succeed: stop
        rp.create("ftl-b-2", RP_H100, PUB)
    assert not isinstance(e.value, NoCapacity)
    with pytest.raises(ProviderError, match="global/invalid-parameters: Invalid request data. instance_type_name") as e:
        lm.create("ftl-b-1", Offer("lambda", None, "gpu_1x_nope", 1, 1.0, "us-west-1", True), PUB)
    assert e.value.status == 400 and e.value.code == "global/invalid-parameters"
    assert len(_reqs(fake_lambda, "POST", "/api/v1/instance-operations/launch")) == 1
    assert clock.sleeps == []


def test_network_errors_are_retried_then_reported(clock):
    with FakeRunPod() as f:
        url = f.url  # a port that was free and is closed again
    p = provider("runpod", clock, key=RUNPOD_KEY, base_url=url)
    with pytest.raises(ProviderError, match="after 4 attempts.*Connect"):
        p.get("x")
    assert len(clock.sleeps) == 3


@pytest.mark.parametrize("wording", RUNPOD_NO_CAPACITY_WORDINGS)
def test_no_capacity(fake_runpod, fake_lambda, clock, wording):
    """RunPod documents no capacity wording (a 400 with a human `detail`): any wording is the next candidate."""
    rp, lm = provider("runpod", clock), provider("lambda", clock)
    fake_runpod.no_capacity = fake_lambda.no_capacity = True
    fake_runpod.capacity_detail = wording
    text = wording.format(gpu=RP_H100.gpu_type)[:40]
    with pytest.raises(NoCapacity, match=re.escape(text)) as e:
        rp.create("ftl-n-0", RP_H100, PUB)
    assert e.value.status == 400
    with pytest.raises(NoCapacity, match=re.escape(text)):
        rp.create_cluster("ftl-n-1", RP_H100, 2, PUB)
    with pytest.raises(NoCapacity, match="Not enough capacity to fulfill launch request") as e:
        lm.create("ftl-n-2", LM_H100, PUB)
    assert e.value.code == "instance-operations/launch/insufficient-capacity"
    with pytest.raises(NoCapacity, match="no region with capacity"):
        lm.create("ftl-n-3", Offer("lambda", "a100-40gb", "gpu_1x_a100_sxm4", 1, 1.29, None, False), PUB)
    assert fake_runpod.running() == [] and fake_lambda.running() == []


@pytest.mark.parametrize("name", ["runpod", "lambda"])
def test_never_ready_times_out(name, fake_runpod, fake_lambda, clock):
    fake = fake_runpod if name == "runpod" else fake_lambda
    fake.never_ready = True
    p = provider(name, clock)
    inst = p.create("ftl-slow-0", RP_H100 if name == "runpod" else LM_H100, PUB)
    with pytest.raises(ProviderTimeout, match=f"{inst.id}.*not ready after 30s"):
        p.wait_ready(inst.id, timeout_s=30, poll_s=5)
    assert len(fake.running()) == 1  # the caller decides to terminate
    p.terminate(inst.id)


def test_ready_after_seconds(clock):
    with FakeRunPod(ready_after_polls=10**6, ready_after_s=0.0) as f:
        p = provider("runpod", clock, key=f.key, base_url=f.url)
        inst = p.create("ftl-s-0", RP_H100, PUB)
        assert p.wait_ready(inst.id, timeout_s=5).status == "running"


# --- keys ------------------------------------------------------------------------------------------


def test_missing_key_names_the_env_var(monkeypatch, tmp_path):
    monkeypatch.setenv("FTL_CONFIG_DIR", str(tmp_path))
    for env, name in (("RUNPOD_API_KEY", "runpod"), ("LAMBDA_API_KEY", "lambda")):
        monkeypatch.delenv(env, raising=False)
        with pytest.raises(AuthError, match=env) as e:
            get_provider(name)
        assert e.value.env_var == env and "credentials.yaml" in str(e.value)


def test_credentials_file_and_its_mode(fake_lambda, monkeypatch, tmp_path, caplog, clock):
    monkeypatch.delenv("LAMBDA_API_KEY")
    cfg = tmp_path / "cfg"
    cfg.mkdir()
    monkeypatch.setenv("FTL_CONFIG_DIR", str(cfg))
    f = cfg / "credentials.yaml"
    f.write_text(f"lambda:\n  api_key: {LAMBDA_KEY}\n")
    os.chmod(f, 0o644)
    with caplog.at_level(logging.WARNING, logger="ftl.providers"):
        assert provider("lambda", clock).list() == []
    assert "chmod 600" in caplog.text and LAMBDA_KEY not in caplog.text
    caplog.clear()
    os.chmod(f, 0o600)
    with caplog.at_level(logging.WARNING, logger="ftl.providers"):
        provider("lambda", clock)
    assert "chmod" not in caplog.text


def test_the_key_never_shows(fake_runpod, fake_lambda, monkeypatch, caplog, clock):
    caplog.set_level(logging.DEBUG)
    seen = []
    rp, lm = provider("runpod", clock), provider("lambda", clock)
    fake_runpod.fail_next(400, path_prefix="/v2/pods", message=f"bad request from token {RUNPOD_KEY}")
    fake_lambda.fail_next(500, n=4, message=f"upstream said {LAMBDA_KEY}")
    for call in (lambda: rp.get("x"), lm.list):
        with pytest.raises(ProviderError) as e:
            call()
        seen += [str(e.value), repr(e.value)]
    assert "token ***" in seen[0]
    monkeypatch.setenv("RUNPOD_API_KEY", "rpa_WRONG_key_000")
    with pytest.raises(AuthError, match="HTTP 401.*RUNPOD_API_KEY") as e:
        provider("runpod", clock).list()
    assert e.value.status == 401
    seen += [str(e.value), repr(e.value), repr(rp), repr(lm), repr(rp.http), repr(lm.http), str(vars(rp.http).keys())]
    seen.append(caplog.text)
    for text in seen:
        assert RUNPOD_KEY not in text and LAMBDA_KEY not in text and "rpa_WRONG_key_000" not in text
    assert all(r["headers"].get("Authorization") in (None, "<redacted>") for r in fake_runpod.requests)


# --- the fakes themselves --------------------------------------------------------------------------


def test_fakes_check_auth_and_fields(fake_runpod, fake_lambda):
    fake_runpod.check_requests = fake_lambda.check_requests = False  # bad bodies on purpose
    with httpx.Client() as c:
        r = c.get(fake_runpod.url + "/v2/pods")
        assert r.status_code == 401 and r.headers["content-type"] == "application/problem+json"
        assert r.json() == {"title": "Unauthorized", "status": 401, "detail": "missing bearer token"}
        assert c.get(fake_runpod.url + "/v2/pods", headers={"Authorization": "Bearer nope"}).status_code == 401
        ok = {"Authorization": f"Bearer {RUNPOD_KEY}"}
        r = c.get(fake_runpod.url + "/v2/pods", headers=ok)
        assert r.status_code == 200 and r.json() == {"pods": []} and "RateLimit" in r.headers
        r = c.post(fake_runpod.url + "/v2/pods", headers=ok,
                   json={"name": "x", "image": "i", "gpu": {"id": "NVIDIA H100 80GB HBM3", "minRamPerGpu": 8}, "bogus": 1})
        assert r.status_code == 422 and "$: additional properties 'bogus' not allowed" in r.json()["errors"]
        assert "$.gpu: additional properties 'minRamPerGpu' not allowed" in r.json()["errors"]
        r = c.post(fake_runpod.url + "/v2/pods", headers=ok, json={"name": "x", "gpu": {"id": "NVIDIA H100 80GB HBM3"}})
        assert r.status_code == 400 and r.json()["status"] == 400 and "image" in r.json()["detail"]
        r = c.get(fake_runpod.url + "/v2/catalog/gpus?include=AVAILABILITY", headers=ok)
        assert r.status_code == 400

        r = c.get(fake_lambda.url + "/api/v1/instances", headers={"Authorization": "Bearer nope"})
        assert r.status_code == 401 and r.json()["error"]["code"] == "global/invalid-api-key"
        basic = base64.b64encode(f"{LAMBDA_KEY}:".encode()).decode()
        assert c.get(fake_lambda.url + "/api/v1/instances", headers={"Authorization": f"Basic {basic}"}).json() == {"data": []}
        lk = {"Authorization": f"Bearer {LAMBDA_KEY}"}
        r = c.post(fake_lambda.url + "/api/v1/instance-operations/launch", headers=lk, json={"region_name": "us-west-1"})
        assert r.status_code == 400 and r.json()["error"]["code"] == "global/invalid-parameters"
        c.post(fake_lambda.url + "/api/v1/ssh-keys", headers=lk, json={"name": "k", "public_key": PUB})
        r = c.post(fake_lambda.url + "/api/v1/instance-operations/launch", headers=lk,
                   json={"region_name": "us-west-1", "instance_type_name": "gpu_1x_h100_pcie", "ssh_key_names": ["k"],
                         "quantity": 2})
        assert r.status_code == 400 and "Requested too many instances" in r.json()["error"]["message"]
    assert not fake_runpod.crashes and not fake_lambda.crashes
    # the OpenAPI documents refuse the same bodies (tests/openapi_check.py)
    assert any("'bogus'" in p for p in fake_runpod.request_problems)
    assert any("'minRamPerGpu'" in p for p in fake_runpod.request_problems)
    assert any("'instance_type_name' is a required property" in p for p in fake_lambda.request_problems)


def test_unknown_provider():
    with pytest.raises(ProviderError, match="Did you mean 'runpod'"):
        get_provider("runpd")


def test_client_repr_and_scrub():
    c = JsonClient("runpod", RUNPOD_KEY, "http://127.0.0.1:9")
    assert RUNPOD_KEY not in repr(c) and c.scrub(f"x {RUNPOD_KEY} y") == "x *** y"
    c.close()


# --- provisioning: one candidate after another -------------------------------------------------------


def _recipe(tmp_path: Path, **profile):
    prof = tmp_path / "profile.yaml"
    prof.write_text(yaml.safe_dump({"name": "p", "gpus_per_node": 1, "nodes": 1, "price_per_gpu_hour": 3.0, **profile}))
    return load_recipe(SMOKE, cluster=prof)


def _run(tmp_path: Path, rid: str) -> R.Run:
    run = R.Run(rid, tmp_path / "runs" / rid)
    run.dir.mkdir(parents=True)
    return run


def test_provision_tries_the_next_candidate_on_403_and_400_and_lists_every_answer(fake_runpod, clock, tmp_path):
    """RunPod's document: 400 (not placed) and 403 (no access to this pool) mean "try your next candidate"; when
    none places, the error lists what each candidate answered. COMMUNITY offers are skipped, with the reason."""
    fake_runpod.gpus[0]["dataCenters"].append({"id": "US-GA-1", "name": "US Georgia 1", "availability": "MEDIUM"})
    fake_runpod.refuse[("NVIDIA H100 80GB HBM3", "US-GA-1", "SECURE")] = (403, "access denied")
    recipe = _recipe(tmp_path, provider="runpod", gpu="h100-sxm")
    p, notes = provider("runpod", clock), []
    insts = provision(_run(tmp_path, "t-0"), recipe, p, PUB, notes.append, lambda: None)
    assert [(i.name, i.status, i.region) for i in insts] == [("ftl-t-0-0", "running", "US-TX-3")]
    assert any("skipping 2 COMMUNITY offer(s)" in n and "no public IP" in n for n in notes), notes
    assert any("US-GA-1" in n and "not placed (403)" in n for n in notes), notes
    assert [(r["json"]["cloud"], r["json"]["dataCenterIds"]) for r in _reqs(fake_runpod, "POST", "/v2/pods")] == [
        ("SECURE", ["US-GA-1"]), ("SECURE", ["US-TX-3"])]
    p.terminate(insts[0].id)
    fake_runpod.no_capacity = True  # now every candidate answers: 403, then 400 (RunPod's capacity text)
    with pytest.raises(RentalError) as e:
        provision(_run(tmp_path, "t-1"), recipe, p, PUB, notes.append, lambda: None)
    msg = str(e.value)
    assert "tried 2 offer(s)" in msg and "HTTP 403: access denied" in msg and "could not be placed" in msg
    assert "every offer answered 400" not in msg  # one was a 403: not a request problem
    assert fake_runpod.running() == []


def test_provision_rents_community_pods_only_when_the_profile_names_the_tier(fake_runpod, clock, tmp_path):
    p, notes = provider("runpod", clock), []
    insts = provision(_run(tmp_path, "c-0"), _recipe(tmp_path, provider="runpod", gpu="h100-sxm", cloud_type="community"),
                      p, PUB, notes.append, lambda: None)
    assert [r["json"]["cloud"] for r in _reqs(fake_runpod, "POST", "/v2/pods")] == ["COMMUNITY"]
    assert not any("skipping" in n for n in notes)
    p.terminate(insts[0].id)


def test_lambda_without_private_ip_meets_on_public_addresses_and_bills_from_ftls_clock(fake_lambda, clock, tmp_path):
    """Lambda's private_ip is optional and its instances have no creation time: the fallback to public addresses
    is said aloud, and spend starts at ftl's own clock when the create answered."""
    fake_lambda.omit_private_ip = True
    ips = iter(["203.0.113.10", "203.0.113.11"])
    fake_lambda.on_create = lambda d: {"ssh_host": next(ips)}
    recipe = _recipe(tmp_path, provider="lambda", gpu="h100-sxm", gpus_per_node=8, nodes=2)
    p, notes, run = provider("lambda", clock), [], _run(tmp_path, "l-0")
    before = time.time()
    insts = provision(run, recipe, p, PUB, notes.append, lambda: None)
    assert [i.private_ip for i in insts] == [None, None]
    nodes = nodes_for(recipe, insts, tmp_path / "key", notes.append)
    assert [n.address for n in nodes] == ["203.0.113.10", "203.0.113.11"]
    assert any("no private address" in n and "public network" in n for n in notes), notes
    rows = run.state()["instances"]
    assert all(r["created_at"] for r in rows) and all(i.created_at is None for i in insts)
    starts = [iso_epoch(r["created_at"]) for r in rows]
    assert all(before - 2 <= t <= time.time() + 1 for t in starts)
    assert spend(rows, now=max(starts) + 3600) == pytest.approx(2 * 23.92, rel=0.01)
    fake_lambda.omit_private_ip = False  # with private addresses: those, and no note
    quiet: list[str] = []
    assert [n.address for n in nodes_for(recipe, [p.get(i.id) for i in insts], tmp_path / "key", quiet.append)] \
        == ["127.0.0.1", "127.0.0.1"] and quiet == []
    for i in insts:
        p.terminate(i.id)


# --- the documents themselves ------------------------------------------------------------------------


def test_the_schema_check_accepts_the_documents_examples_and_refuses_the_old_fake_shapes():
    """tests/openapi_check.py finds the right schema: every response example RunPod's document gives validates
    (241 of them), and the shapes the fakes used to send are refused."""
    rp, lm = document("runpod"), document("lambda")
    n = 0
    for tpl, ops in rp.doc["paths"].items():
        for method, op in ops.items():
            for status, resp in (op.get("responses") or {}).items() if method in ("get", "post", "patch", "delete") else ():
                for ctype, content in (rp._deref(resp).get("content") or {}).items():
                    for ex in (content.get("examples") or {}).values():
                        if "value" in rp._deref(ex):
                            n += 1
                            code = 200 if status == "default" else int(status)
                            path = tpl.replace("{id}", "x").replace("{workerId}", "w")
                            assert rp.response_problems(method.upper(), path, code, rp._deref(ex)["value"], ctype) == []
    assert n > 200
    gpu = {"id": "g", "name": "G", "pool": None, "manufacturer": "NVIDIA", "memory": 80, "secure": True,
           "community": False, "price": {"secure": 1.0, "community": None}, "maxCount": {"secure": 8, "community": 0}}
    assert rp.response_problems("GET", "/v2/catalog/gpus", 200, {"gpus": [gpu]}, "application/json")
    assert rp.response_problems("GET", "/v2/pods", 200, {"pods": [{"id": "p"}]}, "application/json")
    assert lm.response_problems("GET", "/api/v1/instances", 401, {"error": {"code": "global/invalid-api-key",
                                                                              "message": "no"}}, "application/json")
    assert lm.response_problems("GET", "/api/v1/instances", 429, None, "application/json") == []  # silent
    assert ("GET", "/api/v1/instances", 429) in lm.silent
    assert rp.request_problems("POST", "/v2/pods", {"name": "x", "gpu": {"id": "g", "minCudaVersion": "12"}})


def test_provision_says_when_every_offer_answered_a_bare_400(fake_runpod, clock, tmp_path):
    """RunPod's document: a 400 on every candidate is more likely a rule the request breaks than capacity."""
    fake_runpod.gpus[0]["dataCenters"].append({"id": "US-GA-1", "name": "US Georgia 1", "availability": "MEDIUM"})
    fake_runpod.no_capacity = True
    with pytest.raises(RentalError, match="every offer answered 400 without a code"):
        provision(_run(tmp_path, "b-0"), _recipe(tmp_path, provider="runpod", gpu="h100-sxm"), provider("runpod", clock),
                  PUB, lambda _: None, lambda: None)
