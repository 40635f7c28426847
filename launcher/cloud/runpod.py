"""RunPod through REST v2 (https://api.runpod.io/v2; v1 retires 2026-11-15): pods, the GPU catalog, Instant Clusters.

SSH: the pod gets our public key in env `PUBLIC_KEY` (and `SSH_PUBLIC_KEY`, RunPod's per-pod override),
which RunPod images append to root's authorized_keys before starting sshd, and exposes "22/tcp". This
avoids `startSsh`, which injects the *account's* key set that only a whole-set PUT can change (racy
between concurrent launches). The endpoint is `ssh.direct` (public IP + mapped port, user root), else
the `runtime.ports` entry for private port 22; the `ssh.proxy` endpoint is a shell-only relay and is not used.

Placement (the v2 document's create-pod guidance): a 400 is "breaks a cross-field rule, or could not be
placed" and a 403 "your account cannot access the requested pool"; both mean "try your next candidate", so
both come back as NoCapacity (with RunPod's own `detail`), and the caller reports every candidate's answer
when none placed. Capacity has no code of its own, so no wording is matched. 402 (no balance) and 422 (bad
body) stop at once.

Community pods may get no public IP, and v2's create has no `supportPublicIp` (v1/GraphQL had it): their
offers say `public_ip=False`, and the rental backend rents them only when the profile asks for the community
tier by name.

Clusters: stock is read with `product=CLUSTER`, and only SECURE offers are clusters (`CreateClusterRequest`
has no cloud tier). Members get NCCL_SOCKET_IFNAME=ens1 (RunPod's Instant Cluster notes: inter-node traffic
is on ens1..ens8, eth0 is the internet) unless the profile's env sets it.

Other images: RunPod starts sshd from PUBLIC_KEY "only [in] images that honor the convention (all RunPod
official images do)" (`CreatePodRequest.startSsh`). For an image outside `runpod/` ftl passes its own start-up
as `args` ("arguments passed to the container entrypoint"): authorise PUBLIC_KEY, start sshd (installing
openssh-server with apt-get when it is missing), then stay up. That reaches images with no ENTRYPOINT of their
own, or one that runs its arguments (most base images: ubuntu, nvidia/cuda, pytorch/pytorch); an image whose
ENTRYPOINT ignores them still cannot be reached, and the wait for SSH then times out.

CUDA: a pod asks for a host whose CUDA is at least the image's (`gpu.minCudaVersion`, from a `cuXYZ` tag such
as the default image's cu1281 -> 12.8); the cluster request has no such field.
"""

from __future__ import annotations

import re
import time
from typing import Any, Callable
from urllib.parse import quote

from launcher.spec.catalog import find_gpu, provider_facts
from launcher.core.errors import FtlError
from launcher.cloud.catalogs import runpod_gpus, runpod_key, runpod_price
from launcher.cloud.base import Instance, NoCapacity, Offer, Provider, ProviderError, ProviderTimeout
from launcher.cloud.credentials import api_key
from launcher.cloud.http import JsonClient, create_once

DEFAULT_IMAGE = "runpod/pytorch:1.0.2-cu1281-torch280-ubuntu2404"  # the spec's example image
DEFAULT_DISK_GB = 50
CLOUDS = ("SECURE", "COMMUNITY")
STATUS = {"PROVISIONING": "pending", "STARTING": "pending", "RUNNING": "running", "EXITED": "stopped",
          "ERROR": "error", "TERMINATED": "terminated"}
RUNPOD_IMAGES = "runpod/"  # the images that honour RunPod's PUBLIC_KEY -> sshd convention
SSHD_START = ("sh -c 'mkdir -p /root/.ssh && chmod 700 /root/.ssh && printf \"%s\\n\" \"$PUBLIC_KEY\" >> "
              "/root/.ssh/authorized_keys && chmod 600 /root/.ssh/authorized_keys; "
              "command -v sshd >/dev/null || { command -v apt-get >/dev/null && apt-get update -qq && "
              "DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openssh-server >/dev/null; }; "
              "mkdir -p /run/sshd; ssh-keygen -A >/dev/null 2>&1; $(command -v sshd || echo /usr/sbin/sshd) -e; "
              "exec sleep infinity'")  # ftl's own sshd start-up for images outside RUNPOD_IMAGES
NEXT_CANDIDATE = (400, 403)  # the document: "Try your next candidate" / "Skip this candidate, keep going"
CLUSTER_IFNAME = {"NCCL_SOCKET_IFNAME": "ens1"}
_CUDA_TAG = re.compile(r"(?:^|[^a-z])cu(?:da)?(\d{2})\.?(\d)(?:\.?\d)?(?:[^0-9]|$)", re.I)
CLUSTER_MEMBERS_TIMEOUT_S = 120.0  # how long the members of a new cluster may take to be listed


def _ssh(pod: dict[str, Any]) -> tuple[str | None, int | None, str]:
    direct = (pod.get("ssh") or {}).get("direct") or {}
    if direct.get("host") and direct.get("port"):
        return str(direct["host"]), int(direct["port"]), str(direct.get("username") or "root")
    for p in (pod.get("runtime") or {}).get("ports") or []:
        if p.get("private") == 22 and p.get("type") == "tcp" and p.get("ip") and p.get("public"):
            return str(p["ip"]), int(p["public"]), "root"
    return None, None, "root"


def to_instance(pod: dict[str, Any]) -> Instance:
    raw = str(pod.get("status") or "")
    host, port, user = _ssh(pod)
    cl = pod.get("cluster") or {}
    gpu = pod.get("gpu") or {}
    return Instance(provider="runpod", id=str(pod["id"]), name=str(pod.get("name") or ""),
                    status=STATUS.get(raw, "pending"), ssh_host=host, ssh_port=port, ssh_user=user,
                    private_ip=cl.get("ip"), price_per_hour=pod.get("cost"), gpus=int(gpu.get("count") or 0),
                    created_at=pod.get("createdAt"), rank=cl.get("rank"), raw_status=raw, cluster_id=cl.get("id"),
                    region=pod.get("dataCenterId"), gpu_type=gpu.get("id"))


def min_cuda(image: str) -> str | None:
    """The CUDA version an image's tag names, as RunPod's `major.minor` (cu1281 -> 12.8, cuda12.4.1 -> 12.4,
    nvidia/cuda:12.8.1-... -> 12.8)."""
    if ":" not in image:
        return None
    repo, tag = image.rsplit(":", 1)
    m = _CUDA_TAG.search(tag) or (re.match(r"(\d{2})\.(\d)", tag) if repo.endswith("cuda") else None)
    return f"{int(m.group(1))}.{m.group(2)}" if m else None


def _matches(gpu: str | None, key: str | None, gpu_type: str) -> bool:
    if gpu is None:
        return True
    if gpu.lower() == gpu_type.lower():
        return True
    try:
        return key is not None and find_gpu(gpu).key == key
    except FtlError:
        return False


class RunPod(Provider):
    name = "runpod"

    def __init__(self, key: str | None = None, base_url: str | None = None, *, sleep: Callable[[float], None] = time.sleep,
                 clock: Callable[[], float] = time.monotonic, poll_s: float = 5.0, **http: Any):
        super().__init__(sleep, clock)
        self.poll_s = poll_s
        self.http = JsonClient("runpod", key or api_key("runpod"), base_url, sleep=sleep, clock=clock, **http)

    def check_key(self) -> None:
        self.http.request("GET", "/v2/pods")

    def price_catalog(self) -> Any:
        """The GPU catalog without stock: list prices per GPU and tier (what `ftl prices --refresh` reads)."""
        return self.http.request("GET", str(provider_facts()["runpod"]["prices_path"]))

    # --- offers ----------------------------------------------------------------------------------

    def offers(self, gpu: str | None = None, gpus: int = 1, cluster: bool = False) -> list[Offer]:
        out: list[Offer] = []
        for cloud in ("SECURE",) if cluster else CLOUDS:
            data = self.http.request("GET", "/v2/catalog/gpus", params={
                "include": "AVAILABILITY", "product": "CLUSTER" if cluster else "POD", "count": gpus, "cloud": cloud})
            for g in runpod_gpus(data) or []:
                tier = cloud.lower()
                usd = runpod_price(g, tier)
                if usd is None or gpus > int((g.get("maxCount") or {}).get(tier) or 0):
                    continue
                key = runpod_key(g)
                if not _matches(gpu, key, str(g["id"])):
                    continue
                price = round(usd * gpus, 4)
                dcs = g.get("dataCenters") or []
                rows = [(dc.get("id"), dc.get("availability")) for dc in dcs] or [(None, g.get("availability", "NONE"))]
                for region, level in rows:
                    out.append(Offer("runpod", key, str(g["id"]), gpus, price, region,
                                     available=bool(level) and level != "NONE", cloud_type=cloud,
                                     public_ip=cloud != "COMMUNITY"))
        return sorted(out, key=lambda o: (not o.available, o.price_per_hour, o.gpu_type, o.region or ""))

    # --- create ----------------------------------------------------------------------------------

    def _container(self, ssh_public_key: str, image: str | None, disk_gb: int | None,
                   env: dict[str, str] | None) -> dict[str, Any]:
        key = ssh_public_key.strip()
        img = image or DEFAULT_IMAGE
        out: dict[str, Any] = {"image": img, "disk": int(disk_gb or DEFAULT_DISK_GB), "ports": ["22/tcp"],
                               "env": {**{str(k): str(v) for k, v in (env or {}).items()}, "PUBLIC_KEY": key,
                                       "SSH_PUBLIC_KEY": key}}
        if not img.startswith(RUNPOD_IMAGES):
            out["args"] = SSHD_START
        return out

    def _capacity(self, e: ProviderError, offer: Offer) -> ProviderError:
        if e.status in NEXT_CANDIDATE:
            where = f" in {offer.region}" if offer.region else ""
            return NoCapacity(f"{e} ({offer.gpus}x {offer.gpu_type}, {offer.cloud_type or 'SECURE'}{where}); "
                              "try another GPU, region or cloud", e.status, "runpod", e.code)
        return e

    def create(self, name: str, offer: Offer, ssh_public_key: str, image: str | None = None,
               disk_gb: int | None = None, env: dict[str, str] | None = None) -> Instance:
        gpu: dict[str, Any] = {"id": offer.gpu_type, "count": offer.gpus}
        cuda = min_cuda(image or DEFAULT_IMAGE)
        if cuda:
            gpu["minCudaVersion"] = cuda
        body: dict[str, Any] = {"name": name, "gpu": gpu, "cloud": offer.cloud_type or "SECURE",
                                **self._container(ssh_public_key, image, disk_gb, env)}
        if offer.region:
            body["dataCenterIds"] = [offer.region]
        try:
            pod = create_once(lambda: self.http.request("POST", "/v2/pods", json=body),
                              lambda: next((p for p in self._pods() if p.get("name") == name), None), self.sleep)
        except ProviderError as e:
            raise self._capacity(e, offer) from None
        return to_instance(pod)

    def create_cluster(self, name: str, offer: Offer, nodes: int, ssh_public_key: str, image: str | None = None,
                       disk_gb: int | None = None, env: dict[str, str] | None = None) -> list[Instance]:
        """An Instant Cluster (type TRAINING): one data center, a private network, ranks from RunPod."""
        if nodes < 2:  # clusters start at 2 pods
            inst = self.create(name, offer, ssh_public_key, image, disk_gb, env)
            inst.rank = 0
            return [inst]
        body: dict[str, Any] = {"name": name, "type": "TRAINING",
                                "compute": {"gpuTypeId": offer.gpu_type, "gpuCountPerPod": offer.gpus, "podCount": nodes},
                                **self._container(ssh_public_key, image, disk_gb, {**CLUSTER_IFNAME, **(env or {})})}
        if offer.region:
            body["dataCenterIds"] = [offer.region]
        try:
            cluster = create_once(lambda: self.http.request("POST", "/v2/clusters", json=body),
                                  lambda: next((c for c in self._clusters() if c.get("name") == name), None), self.sleep)
        except ProviderError as e:
            raise self._capacity(e, offer) from None
        cid = str(cluster["id"])
        deadline = self.clock() + CLUSTER_MEMBERS_TIMEOUT_S
        while True:
            pods = self._members(cid)
            if len(pods) >= nodes:
                break
            if self.clock() >= deadline:
                self.terminate_cluster(cid)
                raise ProviderTimeout(f"runpod: cluster {name} ({cid}) listed {len(pods)} of {nodes} pods after "
                                      f"{CLUSTER_MEMBERS_TIMEOUT_S:g}s; deleted it", provider="runpod")
            self.sleep(self.poll_s)
        insts = [to_instance(p) for p in pods]
        return sorted(insts, key=lambda i: (i.rank is None, i.rank if i.rank is not None else 0, i.id))

    # --- read ------------------------------------------------------------------------------------

    def _pods(self) -> list[dict[str, Any]]:
        return (self.http.request("GET", "/v2/pods", params={"includeClusterPods": "true"}) or {}).get("pods") or []

    def _clusters(self) -> list[dict[str, Any]]:
        return (self.http.request("GET", "/v2/clusters") or {}).get("clusters") or []

    def _members(self, cluster_id: str) -> list[dict[str, Any]]:
        try:
            data = self.http.request("GET", f"/v2/clusters/{quote(cluster_id, safe='')}/pods")
        except ProviderError as e:
            if e.status == 404:
                return []
            raise
        return (data or {}).get("pods") or []

    def get(self, id: str) -> Instance | None:
        try:
            pod = self.http.request("GET", f"/v2/pods/{quote(id, safe='')}")
        except ProviderError as e:
            if e.status == 404:
                return None
            raise
        return to_instance(pod) if pod else None

    def _ours(self, keep: Callable[[str], bool]) -> list[Instance]:
        """Pods whose own name, or whose cluster's name, passes `keep` (cluster pods carry RunPod's names)."""
        clusters = {str(c["id"]): str(c.get("name") or "") for c in self._clusters() if keep(str(c.get("name") or ""))}
        pods = {str(p["id"]): p for p in self._pods()
                if keep(str(p.get("name") or "")) or str((p.get("cluster") or {}).get("id")) in clusters}
        for cid in clusters:  # in case the pod list leaves cluster members out
            for p in self._members(cid):
                pods.setdefault(str(p["id"]), p)
        insts = [to_instance(p) for p in pods.values()]
        return [i for i in insts if i.status != "terminated"]

    def list(self, prefix: str = "ftl-") -> list[Instance]:
        return self._ours(lambda n: n.startswith(prefix))

    def find(self, name: str) -> list[Instance]:
        return self._ours(lambda n: n == name)

    # --- delete ----------------------------------------------------------------------------------

    def terminate(self, id: str) -> None:
        """Delete the pod; a cluster member can only go with its cluster (RunPod answers 409), so that is deleted."""
        try:
            self.http.request("DELETE", f"/v2/pods/{quote(id, safe='')}")
        except ProviderError as e:
            if e.status == 404:
                return
            if e.status != 409:
                raise
            inst = self.get(id)
            if inst is None:
                return
            if not inst.cluster_id:
                raise
            self.terminate_cluster(inst.cluster_id)

    def terminate_cluster(self, cluster_id: str) -> None:
        try:
            self.http.request("DELETE", f"/v2/clusters/{quote(cluster_id, safe='')}")
        except ProviderError as e:
            if e.status != 404:
                raise
