"""Model weights fetched once, before a multi-node job starts, into the Hugging Face cache the nodes share.

Compute nodes often have no internet, and N nodes downloading the same 140 GB at once is slow and gets
rate-limited: ftl downloads on the machine it runs on (a login node), into HF_HOME, which the profile
should point at a filesystem every node sees; the job then runs with HF_HUB_OFFLINE=1. A hub token is
read from HF_TOKEN by huggingface_hub itself and never printed.
"""

from __future__ import annotations

import os
from typing import Any

from launcher.core.errors import FtlError
from launcher.spec.catalog import resolve_model

WEIGHT_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "tokenizer*"]


def _offline() -> bool:
    return any(os.environ.get(v, "").lower() in {"1", "true", "yes"} for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def prefetch(recipe: Any) -> str | None:
    """The local folder of the recipe's weights (downloading them if needed); None for a local model."""
    spec = resolve_model(recipe.model)
    if spec.origin == "local" or not spec.hub_id:
        return None
    from huggingface_hub import snapshot_download  # third-party, only when weights must be fetched
    from huggingface_hub.constants import HF_HUB_CACHE

    try:
        return snapshot_download(spec.hub_id, allow_patterns=WEIGHT_PATTERNS, local_files_only=_offline())
    except Exception as e:  # noqa: BLE001 - offline miss, auth, missing repo: say which, without the token
        why = type(e).__name__
        if _offline():
            raise FtlError(f"model = {recipe.model!r}: the weights of {spec.hub_id} are not in the Hugging Face cache "
                           f"({HF_HUB_CACHE}) and HF_HUB_OFFLINE=1 forbids downloading them; download them once "
                           "(unset HF_HUB_OFFLINE) into an HF_HOME every node shares, or point model at a local "
                           "folder") from None
        raise FtlError(f"model = {recipe.model!r}: could not download {spec.hub_id} ({why}); check the name, and "
                       "HF_TOKEN for gated models") from None
