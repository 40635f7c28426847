"""Data files about the world (model architectures, GPUs, prices, providers, calibration priors) and their loaders.

A model reference resolves, in order: a catalog name or alias, a local directory with config.json,
a hub id whose config.json was cached before, then (online only) a fetch of that one file.
"""

from __future__ import annotations

import json
import os
import socket
import threading
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from launcher.core.errors import FtlError, did_you_mean

CATALOG_DIR = Path(__file__).resolve().parent
_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def _load(name: str) -> dict[str, Any]:
    with open(CATALOG_DIR / name) as f:
        return yaml.load(f, Loader=_Loader) or {}


@lru_cache(maxsize=None)
def models() -> dict[str, dict[str, Any]]:
    return _load("models.yaml")


@lru_cache(maxsize=None)
def lowest_shipped_price(gpu: str) -> tuple[float, str] | None:
    """(USD per GPU-hour, "provider tier") of the cheapest shipped on-demand price of a GPU catalog key
    (prices.yaml, dated per row; live prices are the cloud layer's), or None when none is shipped."""
    rows = [(float(row["usd"]), f"{provider} {tier}")
            for provider, doc in _load("prices.yaml").items() if isinstance(doc, dict)
            for tier, table in (doc.get("tiers") or {}).items()
            for key, row in (table or {}).items() if key == gpu]
    return min(rows) if rows else None


@lru_cache(maxsize=None)
def gpus() -> dict[str, dict[str, Any]]:
    return _load("gpus.yaml")


@lru_cache(maxsize=None)
def provider_facts() -> dict[str, dict[str, Any]]:
    """providers.yaml: API URLs, key variables, price endpoints and boot/download priors per rented provider."""
    return _load("providers.yaml")


@lru_cache(maxsize=None)
def calibration() -> dict[str, dict[str, Any]]:
    """calibration.yaml: the estimator's priors that are not tensor arithmetic (overhead, characters per token)."""
    return _load("calibration.yaml")


def index(table: dict[str, dict[str, Any]], extra: str | None = None) -> dict[str, str]:
    idx: dict[str, str] = {}
    for key, entry in table.items():
        names = [key, *(entry.get("aliases") or [])]
        if extra and entry.get(extra):
            names.append(entry[extra])
        for n in names:
            idx[str(n).lower()] = key
    return idx


@dataclass(frozen=True)
class ModelSpec:
    name: str  # catalog key, directory or hub id, as the user knows it
    config: dict[str, Any]
    origin: str  # "catalog", "local", "hub-cache", "hub"
    hub_id: str | None = None
    path: str | None = None  # local directory, when the weights (or at least config.json) are local


class UnknownModel(FtlError):
    pass


def cache_root() -> Path:
    """ftl's per-user cache: $FTL_CACHE, else $XDG_CACHE_HOME/ftl (an empty value counts as unset, as the
    XDG spec says), else ~/.cache/ftl. Hub configs, probed inventories and live prices live under it."""
    return Path(os.environ.get("FTL_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache", "ftl"))


def config_cache_dir() -> Path:
    return cache_root() / "configs"


def _offline() -> bool:
    return any(os.environ.get(v, "").lower() in {"1", "true", "yes"} for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "FTL_OFFLINE"))


def _fetch_config(hub_id: str, dest: Path) -> dict[str, Any]:
    from huggingface_hub import hf_hub_download  # only when a config must be fetched

    path = hf_hub_download(hub_id, "config.json", token=os.environ.get("HF_TOKEN"))
    cfg = json.loads(Path(path).read_text())
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(json.dumps(cfg, indent=1))
    return cfg


HUB_PROBE_S = 1.5  # how long ftl waits to learn whether the hub can be reached at all


def _hub_host() -> tuple[str, int]:
    url = urlsplit(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    return url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)


def _hub_reachable(timeout: float = HUB_PROBE_S) -> bool:
    """Whether a TCP connection to the hub opens within `timeout` seconds (name lookup included, which a socket
    timeout does not bound: it runs in a thread that is abandoned when late). Offline, huggingface_hub would
    retry for half a minute ("Retrying in 8s") before failing; this fails in seconds instead. Behind a proxy
    the hub is not probed (the proxy decides)."""
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    ok: list[bool] = []

    def probe() -> None:
        try:
            socket.create_connection(_hub_host(), timeout=timeout).close()
            ok.append(True)
        except OSError:
            pass

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout)
    return bool(ok)


def model_names() -> list[str]:
    """The names a model may be given as and resolve: catalog names and hub ids exactly as `ftl models` lists
    them (for did-you-mean: never a lowercased hub id, which the hub would not know)."""
    return [*models(), *(e["hub_id"] for e in models().values() if e.get("hub_id"))]


def _not_here(ref: str, why: str) -> UnknownModel:
    cached = f", or put its config.json at {config_cache_dir() / ref / 'config.json'}" if ref.count("/") == 1 else ""
    return UnknownModel(
        f"model = {ref!r}: {why}.{did_you_mean(ref, model_names())} Use a catalog name (ftl models), or a local "
        f"folder holding the model's config.json (model: /path/to/folder){cached}")


def resolve_model(ref: str) -> ModelSpec:
    idx = index(models(), "hub_id")
    key = idx.get(ref.lower())
    if key:
        entry = models()[key]
        return ModelSpec(key, dict(entry["config"]), "catalog", hub_id=entry.get("hub_id"))
    p = Path(ref).expanduser()
    if (p / "config.json").is_file():
        return ModelSpec(ref, json.loads((p / "config.json").read_text()), "local", path=str(p.resolve()))
    if p.exists() or ref.startswith((".", "/", "~")):
        raise UnknownModel(f"model = {ref!r}: {p} has no config.json; point 'model' at a folder saved with save_pretrained")
    if ref.count("/") == 1:
        cached = config_cache_dir() / ref / "config.json"
        if cached.is_file():
            return ModelSpec(ref, json.loads(cached.read_text()), "hub-cache", hub_id=ref)
        if _offline():
            raise _not_here(ref, "not cached here, and offline (HF_HUB_OFFLINE) so the hub cannot be asked")
        if not _hub_reachable():
            host, port = _hub_host()
            raise _not_here(ref, f"not cached here, and the hub ({host}:{port}) cannot be reached to fetch its "
                                 "config.json")
        try:
            return ModelSpec(ref, _fetch_config(ref, cached), "hub", hub_id=ref)
        except Exception as e:  # network, auth, missing repo: say which
            raise _not_here(ref, f"could not fetch its config.json from the hub ({type(e).__name__}: "
                                 f"{(str(e).splitlines() or [''])[0][:200]})") from None
    raise _not_here(ref, "not a catalog name, not a local folder with config.json, and not a hub id (owner/name)")


@dataclass(frozen=True)
class GpuSpec:
    key: str
    name: str
    memory_bytes: int
    bf16_tflops: float
    fp16_tflops: float
    fp32_tflops: float
    fp8_tflops: float | None
    memory_bandwidth_gbps: float
    intra_node_bandwidth_gbps: float
    pcie_bandwidth_gbps: float
    intra_node_link: str
    source: str


def find_gpu(ref: str, field: str = "gpu") -> GpuSpec:
    """The catalog entry of a GPU name or alias; FtlError naming `field` (as the user wrote it) when unknown."""
    idx = index(gpus())
    key = idx.get(ref.lower()) or idx.get(ref.lower().replace(" ", "-"))
    if not key:
        raise FtlError(f"{field} = {ref!r}: not in the GPU catalog.{did_you_mean(ref, idx)} Known: {', '.join(gpus())}")
    e = gpus()[key]
    return GpuSpec(
        key=key,
        name=e["name"],
        memory_bytes=int(e["memory_bytes_reported"]),
        bf16_tflops=float(e["bf16_tflops_dense"]),
        fp16_tflops=float(e.get("fp16_tflops_dense") or e["bf16_tflops_dense"]),
        fp32_tflops=float(e.get("tf32_tflops_dense") or e.get("fp32_tflops") or 0),
        fp8_tflops=e.get("fp8_tflops_dense"),
        memory_bandwidth_gbps=float(e["memory_bandwidth_gbps"]),
        intra_node_bandwidth_gbps=float(e["intra_node_bandwidth_gbps"]),
        pcie_bandwidth_gbps=float(e.get("pcie_bandwidth_gbps") or 32),
        intra_node_link=str(e.get("intra_node_link", "")),
        source=str(e.get("source", "")),
    )


def gpu_key(*names: str | None) -> str | None:
    """The catalog key of the first name the GPU catalog knows (providers name GPUs their own way)."""
    for n in names:
        if not n:
            continue
        try:
            return find_gpu(n).key
        except FtlError:
            continue
    return None
