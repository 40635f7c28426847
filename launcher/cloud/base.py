"""What every GPU provider looks like to ftl: offers, instances, errors, and the abstract client.

One module per provider (SkyPilot's layout) implements `Provider`; the launcher only sees these types,
so RunPod pods, RunPod Instant Cluster members and Lambda instances all come back as `Instance`.
"""

from __future__ import annotations

import json
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable

from launcher.core.errors import FtlError

STATUSES = ("pending", "running", "stopped", "terminated", "error")


def provider_message(body: bytes) -> str:
    """The human part of a provider's error body (RunPod problem+json / {message}; Lambda {error:{...}})."""
    text = body.decode("utf-8", "replace").strip()
    try:
        d = json.loads(text)
    except json.JSONDecodeError:
        return text[:300]
    if isinstance(d, dict):
        if isinstance(d.get("error"), dict):  # Lambda
            e = d["error"]
            parts = [f"{e.get('code')}: {e.get('message')}" if e.get("code") else str(e.get("message"))]
            if e.get("suggestion"):
                parts.append(str(e["suggestion"]))
            return " ".join(parts)
        if d.get("detail") or d.get("title"):  # RunPod v2 problem+json
            msg = str(d.get("detail") or d.get("title"))
            if d.get("errors"):
                msg += " (" + "; ".join(map(str, d["errors"])) + ")"
            return msg
        if d.get("message"):  # RunPod v1
            return str(d["message"])
        if isinstance(d.get("errors"), list) and d["errors"]:  # GraphQL
            return "; ".join(str(e.get("message", e)) if isinstance(e, dict) else str(e) for e in d["errors"])
    return text[:300]


def scrub(text: str, secret: str) -> str:
    return text.replace(secret, "***") if secret else text


@dataclass(frozen=True)
class Offer:
    """One thing that can be rented now: a GPU type x count in a region (and RunPod cloud tier)."""

    provider: str
    gpu: str | None  # ftl GPU catalog key (launcher/spec/catalog/gpus.yaml), None when the catalog lacks it
    gpu_type: str  # the provider's id: RunPod gpuTypeId, Lambda instance-type name
    gpus: int  # GPUs per instance
    price_per_hour: float  # USD per hour for the whole instance
    region: str | None  # RunPod data center id, Lambda region name; None = let the provider choose
    available: bool
    cloud_type: str | None = None  # RunPod "SECURE" | "COMMUNITY"; None for Lambda
    public_ip: bool = True  # False: the instance may get no public address, so SSH may never reach it


@dataclass
class Instance:
    """One machine we rent; enough to reach it over SSH and to find it again by name."""

    provider: str
    id: str
    name: str
    status: str  # one of STATUSES
    ssh_host: str | None
    ssh_port: int | None
    ssh_user: str
    private_ip: str | None  # address on the provider's private/cluster network (rendezvous address)
    price_per_hour: float | None
    gpus: int
    created_at: str | None
    rank: int | None = None  # node rank inside a multi-node launch, 0 = primary
    raw_status: str | None = None  # the provider's own status value
    cluster_id: str | None = None  # RunPod Instant Cluster id (members are deleted with the cluster)
    region: str | None = None
    gpu_type: str | None = None

    @property
    def ready(self) -> bool:
        """Running with a known SSH endpoint (RunPod cluster members: also a rank and a cluster address)."""
        if self.status != "running" or not self.ssh_host or not self.ssh_port:
            return False
        return self.cluster_id is None or (self.rank is not None and bool(self.private_ip))


class ProviderError(FtlError):
    """A provider call failed; the message carries the provider's own words (never the API key)."""

    def __init__(self, message: str, status: int | None = None, provider: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.provider, self.code = status, provider, code


class NoCapacity(ProviderError):
    """The provider has no machine for this offer now; try another offer or region."""


class ProviderTimeout(ProviderError):
    """An instance did not become ready in time; the caller decides to terminate it."""


class AuthError(ProviderError):
    """No API key, or the provider refused it; names the env var to set."""

    def __init__(self, message: str, env_var: str, status: int | None = None, provider: str | None = None,
                 code: str | None = None):
        super().__init__(message, status, provider, code)
        self.env_var = env_var


class Provider(ABC):
    """A GPU cloud: list offers, create / find / terminate instances, wait for SSH."""

    name: str
    poll_s: float = 5.0
    http: Any  # the provider's one HTTP client (launcher.cloud.http.JsonClient)

    def __init__(self, sleep: Callable[[float], None] = time.sleep, clock: Callable[[], float] = time.monotonic):
        self.sleep, self.clock = sleep, clock

    @abstractmethod
    def check_key(self) -> None:
        """One authenticated read, so a refused key stops a launch before anything is asked or written
        (AuthError on 401, ProviderError otherwise)."""

    @abstractmethod
    def price_catalog(self) -> Any:
        """The provider's answer listing its list prices (catalogs.py parses it, for offers and `ftl prices`)."""

    @abstractmethod
    def offers(self, gpu: str | None = None, gpus: int = 1, cluster: bool = False) -> list[Offer]:
        """Offers for `gpus` GPUs per instance, cheapest available first; `gpu` is a catalog name or provider id;
        `cluster`: offers that `create_cluster` can rent (RunPod: Instant Cluster stock, SECURE only)."""

    @abstractmethod
    def create(self, name: str, offer: Offer, ssh_public_key: str, image: str | None = None,
               disk_gb: int | None = None, env: dict[str, str] | None = None) -> Instance:
        """Start one instance named `name`; NoCapacity when the provider has none for this offer."""

    @abstractmethod
    def create_cluster(self, name: str, offer: Offer, nodes: int, ssh_public_key: str, image: str | None = None,
                       disk_gb: int | None = None, env: dict[str, str] | None = None) -> list[Instance]:
        """Start `nodes` instances of `offer` on one private network, in rank order."""

    @abstractmethod
    def get(self, id: str) -> Instance | None:
        """The instance, or None when the provider no longer knows it."""

    @abstractmethod
    def list(self, prefix: str = "ftl-") -> list[Instance]:
        """Live instances whose name (or cluster name) starts with `prefix`: finds orphans without local state."""

    def find(self, name: str) -> list[Instance]:
        """Live instances named exactly `name` (RunPod: also the members of the cluster named `name`)."""
        return [i for i in self.list(prefix=name) if i.name == name]

    @abstractmethod
    def terminate(self, id: str) -> None:
        """Delete the instance; an instance that is already gone is not an error."""

    def wait_ready(self, id: str, timeout_s: float, poll_s: float | None = None) -> Instance:
        """Poll until running with an SSH endpoint; ProviderTimeout after timeout_s (the caller terminates)."""
        poll = self.poll_s if poll_s is None else poll_s
        deadline = self.clock() + timeout_s
        last: Instance | None = None
        while True:
            last = self.get(id)
            if last is None:
                raise ProviderError(f"{self.name}: instance {id} disappeared while starting", provider=self.name)
            if last.ready:
                return last
            if last.status in ("terminated", "error", "stopped"):
                raise ProviderError(f"{self.name}: instance {id} ({last.name}) went to {last.raw_status} while starting",
                                    provider=self.name)
            if self.clock() >= deadline:
                break
            self.sleep(poll)
        raise ProviderTimeout(
            f"{self.name}: instance {id} ({last.name}) not ready after {timeout_s:g}s "
            f"(status {last.raw_status}, ssh {last.ssh_host or '-'}:{last.ssh_port or '-'}); terminate it or wait longer",
            provider=self.name)

    def close(self) -> None:
        self.http.close()

    def __repr__(self) -> str:  # never the key
        return f"<{type(self).__name__} provider={self.name}>"
