"""What the providers' catalogs say, parsed once: RunPod GPU types' per-tier prices, Lambda instance types' GPUs
and cents, and ftl's GPU key for each.

Why one place: offers (runpod.py, lambda_cloud.py) and live prices (prices.py) read the same answers
(RunPod `GET /v2/catalog/gpus`, Lambda `GET /api/v1/instance-types`), and must never disagree on what a type
costs or which GPU it is. No HTTP here, so `ftl prices` without --refresh stays light.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from launcher.spec.catalog import gpu_key

RUNPOD_TIERS = ("secure", "community")
_LAMBDA_TYPE = re.compile(r"^gpu_(\d+)x_(.+)$")


def runpod_gpus(data: Any) -> list[dict[str, Any]] | None:
    """The GPU types of a catalog answer ({"gpus": [...]}), None when it has no such list."""
    gpus = data.get("gpus") if isinstance(data, dict) else None
    return gpus if isinstance(gpus, list) else None


def runpod_key(g: dict[str, Any]) -> str | None:
    """ftl's GPU catalog key for a RunPod GPU type (None when the catalog lacks it)."""
    return gpu_key(g.get("id"), g.get("name"))


def runpod_price(g: dict[str, Any], tier: str) -> float | None:
    """USD per GPU-hour on `tier` ("secure" | "community"), None where the type is not offered there: the
    document requires a number for every tier, so the `secure` / `community` flags say where it is offered."""
    usd = (g.get("price") or {}).get(tier)
    if not g.get(tier) or not usd:
        return None
    return float(usd)


@dataclass(frozen=True)
class LambdaType:
    """One GPU instance type of Lambda's catalog."""

    name: str  # gpu_8x_h100_sxm5
    gpus: int  # GPUs per instance
    cents_per_hour: int  # for the whole instance
    key: str | None  # ftl GPU catalog key, None when the catalog lacks it
    regions: tuple[str, ...]  # regions_with_capacity_available: the stock

    @property
    def usd_per_hour(self) -> float:
        return round(self.cents_per_hour / 100, 4)


def lambda_types(data: Any) -> list[LambdaType] | None:
    """The GPU instance types of an `instance-types` answer ({"data": {name: {...}}}); CPU-only types are left
    out; None when the answer has no such map."""
    types = data.get("data") if isinstance(data, dict) else None
    if not isinstance(types, dict):
        return None
    out = []
    for name, entry in types.items():
        it = (entry or {}).get("instance_type") or {}
        name = str(it.get("name") or name)
        m = _LAMBDA_TYPE.match(name)
        n = int((it.get("specs") or {}).get("gpus") or (m.group(1) if m else 0) or 0)
        cents = it.get("price_cents_per_hour")
        if n <= 0 or "general" in name or cents is None:
            continue
        desc = str(it.get("gpu_description") or "")
        key = gpu_key(name, m.group(2) if m else None, f"gpu_1x_{m.group(2)}" if m else None,
                      desc.split(" (")[0] or None)
        regions = tuple(str(r["name"]) for r in (entry or {}).get("regions_with_capacity_available") or []
                        if isinstance(r, dict) and r.get("name"))
        out.append(LambdaType(name, n, int(cents), key, regions))
    return out
