"""Lambda Cloud through API v1 (https://cloud.lambda.ai/api/v1): instance types, launch, instances, terminate, SSH keys.

Facts that shape this module (providers.md part 2):
* prices are integer cents per hour for the whole instance; `regions_with_capacity_available` is the stock;
* launch takes exactly one SSH key *name* and starts one instance per call (quantity > 1 is refused),
  at most one launch per 12 s and one request per second (catalog/providers.yaml, from Lambda's OpenAPI
  document), so multi-node = N launches, ranked by launch order (kept in a tag);
* there is no env, disk or port field: env goes in through cloud-init `user_data`, disk comes with the type;
* SSH is `ubuntu@<ip>:22`; `ip` / `private_ip` appear once the instance leaves `booting`.
"""

from __future__ import annotations

import hashlib
import re
import shlex
import time
from typing import Any, Callable
from urllib.parse import quote

from launcher.spec.catalog import find_gpu, provider_facts
from launcher.core.errors import FtlError
from launcher.cloud.catalogs import lambda_types
from launcher.cloud.base import Instance, NoCapacity, Offer, Provider, ProviderError
from launcher.cloud.credentials import api_key
from launcher.cloud.http import JsonClient, create_once, log

API = "/api/v1"
SSH_USER = "ubuntu"
STATUS = {"booting": "pending", "unhealthy": "pending", "active": "running", "terminating": "terminated",
          "terminated": "terminated", "preempted": "terminated"}
CAPACITY_CODE = "instance-operations/launch/insufficient-capacity"
NAME_TAG, RANK_TAG = "ftl-name", "ftl-rank"
_UUID = re.compile(r"^[0-9a-f]{8}-?[0-9a-f]{4}-?[0-9a-f]{4}-?[0-9a-f]{4}-?[0-9a-f]{12}$", re.I)


def _tags(d: dict[str, Any]) -> dict[str, str]:
    return {str(t.get("key")): str(t.get("value")) for t in d.get("tags") or [] if isinstance(t, dict)}


def to_instance(d: dict[str, Any]) -> Instance:
    raw = str(d.get("status") or "")
    it = d.get("instance_type") or {}
    cents = it.get("price_cents_per_hour")
    rank = _tags(d).get(RANK_TAG)
    ip = d.get("ip")
    return Instance(provider="lambda", id=str(d["id"]), name=str(d.get("name") or ""), status=STATUS.get(raw, "pending"),
                    ssh_host=ip, ssh_port=22 if ip else None, ssh_user=SSH_USER, private_ip=d.get("private_ip"),
                    price_per_hour=round(cents / 100, 4) if cents is not None else None,
                    gpus=int((it.get("specs") or {}).get("gpus") or 0), created_at=d.get("created_time"),
                    rank=int(rank) if rank and rank.isdigit() else None, raw_status=raw,
                    region=(d.get("region") or {}).get("name"), gpu_type=it.get("name"))


def _material(public_key: str) -> str:
    """Key type + base64 body: the comment does not make a different key."""
    return " ".join(public_key.split()[:2])


def _hostname(name: str) -> str:
    h = re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-")[:63]
    return h if h and h[0].isalnum() else f"ftl-{h}"[:63]


def _user_data(env: dict[str, str]) -> str:
    """cloud-init that appends env to /etc/environment (read by pam_env for SSH sessions, also non-interactive)."""
    lines = "".join(f"      {k}={shlex.quote(str(v))}\n" for k, v in env.items())
    return f"#cloud-config\nwrite_files:\n  - path: /etc/environment\n    append: true\n    content: |\n{lines}"


class Lambda(Provider):
    name = "lambda"

    def __init__(self, key: str | None = None, base_url: str | None = None, *, sleep: Callable[[float], None] = time.sleep,
                 clock: Callable[[], float] = time.monotonic, poll_s: float = 10.0,
                 launch_interval_s: float | None = None, **http: Any):
        super().__init__(sleep, clock)
        self.poll_s = poll_s
        self.launch_interval_s = float(provider_facts()["lambda"]["launch_interval_s"]) if launch_interval_s is None \
            else launch_interval_s  # Lambda's documented launch limit
        self._last_launch: float | None = None
        self.http = JsonClient("lambda", key or api_key("lambda"), base_url, sleep=sleep, clock=clock, **http)

    def check_key(self) -> None:
        self.http.request("GET", f"{API}/instances")

    def price_catalog(self) -> Any:
        """The instance types with prices and stock (offers and `ftl prices --refresh` read the same answer)."""
        return self.http.request("GET", str(provider_facts()["lambda"]["prices_path"]))

    # --- offers ----------------------------------------------------------------------------------

    def offers(self, gpu: str | None = None, gpus: int = 1, cluster: bool = False) -> list[Offer]:
        want = None
        if gpu is not None:
            try:
                want = find_gpu(gpu).key
            except FtlError:
                want = None
        out: list[Offer] = []
        for t in lambda_types(self.price_catalog()) or []:
            if t.gpus != gpus:
                continue
            if gpu is not None and gpu.lower() != t.name.lower() and (want is None or t.key != want):
                continue
            for region in t.regions or (None,):
                out.append(Offer("lambda", t.key, t.name, t.gpus, t.usd_per_hour, region, available=region is not None))
        return sorted(out, key=lambda o: (not o.available, o.price_per_hour, o.gpu_type, o.region or ""))

    # --- SSH keys --------------------------------------------------------------------------------

    def ssh_key_name(self, run_name: str, public_key: str) -> str:
        """The name Lambda knows this public key by: an existing key with the same material, else a new one."""
        mat = _material(public_key)
        keys = (self.http.request("GET", f"{API}/ssh-keys") or {}).get("data") or []
        for k in keys:
            if _material(str(k.get("public_key") or "")) == mat:
                return str(k["name"])
        digest = hashlib.sha256(mat.encode()).hexdigest()[:8]
        name = f"{run_name[:55]}-{digest}"
        try:
            self.http.request("POST", f"{API}/ssh-keys", json={"name": name, "public_key": public_key.strip()})
        except ProviderError as e:
            if e.code != "global/duplicate":
                raise
            name = f"{name}-{hashlib.sha256(run_name.encode()).hexdigest()[:6]}"
            self.http.request("POST", f"{API}/ssh-keys", json={"name": name, "public_key": public_key.strip()})
        return name

    # --- create ----------------------------------------------------------------------------------

    def _pace(self) -> None:
        """At most one launch per launch_interval_s (Lambda's documented launch limit)."""
        if self._last_launch is not None:
            wait = self._last_launch + self.launch_interval_s - self.clock()
            if wait > 0:
                self.sleep(wait)
        self._last_launch = self.clock()

    def _launch(self, name: str, offer: Offer, key_name: str, image: str | None, env: dict[str, str] | None,
                rank: int | None) -> Instance:
        if not offer.region:
            raise NoCapacity(f"lambda: {offer.gpu_type} has no region with capacity now; try another GPU",
                             provider="lambda", code=CAPACITY_CODE)
        tags = [{"key": NAME_TAG, "value": name[:128]}]
        if rank is not None:
            tags.append({"key": RANK_TAG, "value": str(rank)})
        body: dict[str, Any] = {"region_name": offer.region, "instance_type_name": offer.gpu_type,
                                "ssh_key_names": [key_name], "name": name[:64], "hostname": _hostname(name), "tags": tags}
        if image:
            body["image"] = {"id": image} if _UUID.match(image) else {"family": image}
        if env:
            body["user_data"] = _user_data(env)

        def post() -> Any:
            self._pace()
            return self.http.request("POST", f"{API}/instance-operations/launch", json=body)

        def lookup() -> Any:
            found = self.find(name)
            return {"data": {"instance_ids": [found[0].id]}} if found else None

        try:
            data = create_once(post, lookup, self.sleep)
        except ProviderError as e:
            if e.code == CAPACITY_CODE:
                raise NoCapacity(f"{e} ({offer.gpu_type} in {offer.region}); try another region or GPU", e.status,
                                 "lambda", e.code) from None
            raise
        iid = str(((data or {}).get("data") or {}).get("instance_ids", [None])[0])
        inst = self.get(iid)
        if inst is None:  # not listed yet: what we know
            inst = Instance("lambda", iid, name, "pending", None, None, SSH_USER, None, offer.price_per_hour, offer.gpus,
                            None, rank, "booting", region=offer.region, gpu_type=offer.gpu_type)
        return inst

    def create(self, name: str, offer: Offer, ssh_public_key: str, image: str | None = None,
               disk_gb: int | None = None, env: dict[str, str] | None = None) -> Instance:
        if disk_gb:
            log.debug("lambda: disk_gb=%s ignored; the instance type %s fixes the disk", disk_gb, offer.gpu_type)
        return self._launch(name, offer, self.ssh_key_name(name, ssh_public_key), image, env, None)

    def create_cluster(self, name: str, offer: Offer, nodes: int, ssh_public_key: str, image: str | None = None,
                       disk_gb: int | None = None, env: dict[str, str] | None = None) -> list[Instance]:
        """`nodes` instances `<name>-<rank>` in the offer's region, one launch each; all or none."""
        key_name = self.ssh_key_name(name, ssh_public_key)
        out: list[Instance] = []
        try:
            for rank in range(nodes):
                out.append(self._launch(f"{name}-{rank}", offer, key_name, image, env, rank))
        except BaseException:
            for inst in out:
                try:
                    self.terminate(inst.id)
                except ProviderError as e:
                    log.warning("lambda: could not terminate %s (%s) after a failed cluster launch: %s",
                                inst.id, inst.name, e)
            raise
        return out

    # --- read ------------------------------------------------------------------------------------

    def get(self, id: str) -> Instance | None:
        try:
            data = self.http.request("GET", f"{API}/instances/{quote(id, safe='')}")
        except ProviderError as e:
            if e.status == 404:
                return None
            raise
        return to_instance((data or {})["data"])

    def list(self, prefix: str = "ftl-") -> list[Instance]:
        rows = (self.http.request("GET", f"{API}/instances") or {}).get("data") or []
        insts = [to_instance(d) for d in rows if str(d.get("name") or "").startswith(prefix)]
        return [i for i in insts if i.status != "terminated"]

    # --- delete ----------------------------------------------------------------------------------

    def terminate(self, id: str) -> None:
        try:
            self.http.request("POST", f"{API}/instance-operations/terminate", json={"instance_ids": [id]},
                              idempotent=True)
        except ProviderError as e:
            if e.status != 404:
                raise
