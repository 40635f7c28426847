"""GPU providers behind one interface: `get_provider("runpod" | "lambda")` -> `Provider`.

Thin HTTP clients (one module per provider) that rent, find and delete machines and report how to
reach them over SSH; launching jobs on those machines is the launcher's business, not theirs.
"""

from __future__ import annotations

from typing import Any

from launcher.core.errors import did_you_mean
from launcher.spec.recipe import RENTED
from launcher.cloud.base import (STATUSES, AuthError, Instance, NoCapacity, Offer, Provider, ProviderError,
                                     ProviderTimeout)

NAMES = RENTED

__all__ = ["NAMES", "STATUSES", "AuthError", "Instance", "NoCapacity", "Offer", "Provider", "ProviderError",
           "ProviderTimeout", "get_provider"]


def get_provider(name: str, **options: Any) -> Provider:
    """The client for `name`; options (key, base_url, sleep, clock, poll_s, timeout_s, attempts, ...) go to it.

    Raises AuthError, naming the env var, when no API key is configured.
    """
    n = name.strip().lower()
    if n == "runpod":
        from launcher.cloud.runpod import RunPod

        return RunPod(**options)
    if n in ("lambda", "lambda_cloud", "lambdalabs"):
        from launcher.cloud.lambda_cloud import Lambda

        return Lambda(**options)
    raise ProviderError(f"unknown provider {name!r}.{did_you_mean(name, NAMES)} Known: {', '.join(NAMES)}")
