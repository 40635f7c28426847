"""GPU prices: the shipped snapshot (catalog/prices.yaml), live prices from RunPod and Lambda, a per-user cache.

Every price is on-demand USD per GPU-hour for one GPU catalog key, in one provider tier:

Where each provider's prices come from is data (catalog/providers.yaml); the calls go through the provider's
own client (launcher.cloud.get_provider: the one HTTP client, retry policy, key lookup and scrubber that
renting uses), and the answers are parsed by launcher.cloud.catalogs, as the offers are:

* runpod / secure, runpod / community: `GET {FTL_RUNPOD_API_URL or https://api.runpod.io}/v2/catalog/gpus`
  with `Authorization: Bearer $RUNPOD_API_KEY`; `price.secure` / `price.community` are USD per GPU.
* lambda / on-demand: `GET {FTL_LAMBDA_API_URL or https://cloud.lambda.ai}/api/v1/instance-types` with
  `Authorization: Bearer $LAMBDA_API_KEY`; `price_cents_per_hour` is integer cents for the whole
  instance, so the per-GPU price is cents / 100 / the instance's GPU count.

When several provider types map to one catalog key (RunPod's A100 SXM and PCIe 80GB, Lambda's 1x and
8x H100 SXM) the lowest per-GPU price is kept, and its provider type is shown beside it.
Live prices are cached in $FTL_CACHE/prices.json (else ~/.cache/ftl/prices.json) and win over the
shipped ones for the same provider, tier and GPU. API keys (the env var, else the credentials file, as
for renting) are never printed, logged or written.
"""

from __future__ import annotations

import datetime as dt
import json
import os
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable

import yaml

from launcher.cloud import get_provider
from launcher.cloud.base import AuthError, ProviderError
from launcher.cloud.catalogs import RUNPOD_TIERS, lambda_types, runpod_gpus, runpod_key, runpod_price
from launcher.core.errors import FtlError
from launcher.core.files import write_atomic
from launcher.spec.catalog import CATALOG_DIR, cache_root, find_gpu, provider_facts
from launcher.spec.recipe import PRICE_STALE_DAYS, RENTED

STALE_DAYS = PRICE_STALE_DAYS

PROVIDERS = RENTED  # whose live prices ftl reads (facts: catalog/providers.yaml)


class PriceError(FtlError):
    pass


@dataclass
class Price:
    provider: str
    tier: str
    gpu: str  # GPU catalog key
    usd_per_gpu_hour: float
    date: str  # ISO date the price was true on (snapshot date, or the day it was fetched)
    source: str
    fetched_at: str | None = None  # ISO time of a live read; None for shipped prices
    provider_type: str | None = None  # the provider's own name: RunPod GPU id, Lambda instance type

    @property
    def live(self) -> bool:
        return self.fetched_at is not None

    def age_days(self, today: dt.date | None = None) -> int:
        return ((today or dt.date.today()) - dt.date.fromisoformat(self.date[:10])).days

    def stale(self, today: dt.date | None = None) -> bool:
        return self.age_days(today) > STALE_DAYS

    def to_json(self, today: dt.date | None = None) -> dict[str, Any]:
        return {**asdict(self), "live": self.live, "age_days": self.age_days(today), "stale": self.stale(today)}


# ---------------------------------------------------------------------------------------------
# shipped snapshot and cache


@lru_cache(maxsize=None)
def _shipped_data() -> dict[str, Any]:
    with open(CATALOG_DIR / "prices.yaml") as f:
        return yaml.safe_load(f) or {}


def shipped() -> list[Price]:
    """The shipped prices: each row with the day it was read and the public source that states it."""
    out = []
    for provider, block in _shipped_data().items():
        for tier, table in (block.get("tiers") or {}).items():
            for gpu, row in (table or {}).items():
                out.append(Price(provider, tier, gpu, float(row["usd"]), str(row["date"]), str(row["source"]),
                                 provider_type=row.get("type")))
    return out


def cache_path() -> Path:
    return cache_root() / "prices.json"


def load_cache() -> dict[str, Any]:
    p = cache_path()
    try:
        return json.loads(p.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, json.JSONDecodeError):
        return {}  # a broken cache is ignored; the next --refresh rewrites it


def cached() -> list[Price]:
    out = []
    for provider, block in load_cache().items():
        for row in block.get("prices") or []:
            try:
                out.append(Price(**{k: row.get(k) for k in Price.__dataclass_fields__}))
            except TypeError:
                continue
    return out


def all_prices(provider: str | None = None, gpu: str | None = None) -> list[Price]:
    """Shipped prices, with cached live prices replacing them per (provider, tier, gpu)."""
    rows: dict[tuple[str, str, str], Price] = {}
    for p in shipped() + cached():
        rows[(p.provider, p.tier, p.gpu)] = p
    out = list(rows.values())
    if provider:
        out = [p for p in out if p.provider == provider.lower()]
    if gpu:
        key = find_gpu(gpu).key
        out = [p for p in out if p.gpu == key]
    order = {k: i for i, k in enumerate(PROVIDERS)}
    return sorted(out, key=lambda p: (order.get(p.provider, 9), p.provider, p.tier, p.usd_per_gpu_hour, p.gpu))


def lookup(provider: str, gpu: str, tier: str | None = None) -> Price | None:
    rows = [p for p in all_prices(provider, gpu) if tier is None or p.tier == tier]
    return rows[0] if rows else None


# ---------------------------------------------------------------------------------------------
# HTTP


def _keep_lowest(rows: dict[tuple[str, str], Price], p: Price) -> None:
    k = (p.tier, p.gpu)
    if k not in rows or p.usd_per_gpu_hour < rows[k].usd_per_gpu_hour:
        rows[k] = p


def parse_runpod(data: Any, fetched_at: str) -> tuple[list[Price], list[str]]:
    """Rows from a v2 `GET /v2/catalog/gpus` answer ({"gpus": [...]}) and the GPU ids not in the catalog."""
    gpus = runpod_gpus(data)
    if gpus is None:
        raise PriceError("runpod: the answer has no 'gpus' list")
    rows: dict[tuple[str, str], Price] = {}
    unknown = []
    src = provider_facts()["runpod"]["prices_source"]
    for g in gpus:
        key = runpod_key(g)
        if key is None:
            unknown.append(str(g.get("id")))
            continue
        for tier in RUNPOD_TIERS:
            usd = runpod_price(g, tier)
            if usd is not None:
                _keep_lowest(rows, Price("runpod", tier, key, usd, fetched_at[:10], src, fetched_at, str(g.get("id"))))
    return list(rows.values()), unknown


def parse_lambda(data: Any, fetched_at: str) -> tuple[list[Price], list[str]]:
    """Rows from `GET /api/v1/instance-types` ({"data": {name: {"instance_type": {...}, ...}}})."""
    types = lambda_types(data)
    if types is None:
        raise PriceError("lambda: the answer has no 'data' map of instance types")
    rows: dict[tuple[str, str], Price] = {}
    unknown = []
    src = provider_facts()["lambda"]["prices_source"]
    for t in types:
        if t.key is None:
            unknown.append(t.name)
            continue
        _keep_lowest(rows, Price("lambda", "on-demand", t.key, round(t.cents_per_hour / 100 / t.gpus, 4),
                                 fetched_at[:10], src, fetched_at, t.name))
    return list(rows.values()), unknown


def fetch(provider: str, now: dt.datetime | None = None, **options: Any) -> tuple[list[Price], list[str]]:
    """Live prices of one provider through its client (get_provider: timeouts, retries on 429/5xx, the key from
    the env var or credentials.yaml, scrubbed); PriceError naming the env var when no key is configured.
    `options` go to the client (tests: attempts, sleep); FTL_PRICES_BACKOFF_S shortens the backoff."""
    if provider not in PROVIDERS:
        raise PriceError(f"unknown provider {provider!r}; known: {', '.join(PROVIDERS)}")
    facts = provider_facts()[provider]
    if os.environ.get("FTL_PRICES_BACKOFF_S"):
        options.setdefault("backoff_s", float(os.environ["FTL_PRICES_BACKOFF_S"]))
    try:
        client = get_provider(provider, **options)
    except AuthError:
        raise PriceError(f"{provider}: set {facts['key_env']} to read live prices (an API key from the {provider} "
                         f"console, or '{provider}: {{api_key: ...}}' in credentials.yaml); showing the shipped "
                         "prices") from None
    fetched_at = (now or dt.datetime.now(dt.timezone.utc)).isoformat(timespec="seconds")
    try:
        data = client.price_catalog()
    except ProviderError as e:
        raise PriceError(str(e)) from None
    finally:
        client.close()
    return (parse_runpod if provider == "runpod" else parse_lambda)(data, fetched_at)


def refresh(providers: Iterable[str] | None = None, now: dt.datetime | None = None) -> dict[str, dict[str, Any]]:
    """Fetch each provider and cache what came back; {provider: {"ok", "count", "unknown", "error"}}."""
    providers = list(providers or PROVIDERS)
    cache = load_cache()
    summary: dict[str, dict[str, Any]] = {}
    for prov in providers:
        try:
            rows, unknown = fetch(prov, now)
        except PriceError as e:
            summary[prov] = {"ok": False, "error": str(e)}
            continue
        cache[prov] = {"fetched_at": rows[0].fetched_at if rows else None, "prices": [asdict(r) for r in rows],
                       "unknown_types": unknown}
        summary[prov] = {"ok": True, "count": len(rows), "unknown": unknown}
    if any(s["ok"] for s in summary.values()):
        p = cache_path()
        p.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(p, json.dumps(cache, indent=1) + "\n", mode=0o600)
    return summary


def profile_prices(paths: Iterable[Path]) -> list[dict[str, Any]]:
    """Prices of cluster profiles (owned clusters may price at 0 or an internal rate)."""
    out = []
    for path in paths:
        files = sorted(Path(path).glob("*.y*ml")) if Path(path).is_dir() else [Path(path)]
        for f in files:
            try:
                d = yaml.safe_load(f.read_text()) or {}
            except (OSError, yaml.YAMLError):
                continue
            if not isinstance(d, dict) or "price_per_gpu_hour" not in d:
                continue
            out.append({"profile": d.get("name") or f.stem, "file": str(f), "provider": d.get("provider"),
                        "gpu": d.get("gpu"), "usd_per_gpu_hour": float(d.get("price_per_gpu_hour") or 0),
                        "date": str(d["price_date"]) if d.get("price_date") else None,
                        "source": d.get("price_source")})
    return out
