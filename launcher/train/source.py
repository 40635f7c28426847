"""Where a recipe's model loads from (a local folder, a catalog name or a hub id) and its tokenizer.

Torch-free, so that `ftl preview` can render what trains without importing the training stack.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from launcher.core.errors import FtlError
from launcher.spec.catalog import index as catalog_index
from launcher.spec.catalog import models

log = logging.getLogger("ftl.train")

WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.safetensors.index.json", "*.bin.index.json", "*.pt", "*.pth")


@dataclass(frozen=True)
class ModelSource:
    ref: str  # what the recipe says
    path: str  # local folder or hub id to load from
    local: bool
    has_weights: bool


def has_weights(folder: Path) -> bool:
    return any(any(folder.glob(p)) for p in WEIGHT_PATTERNS)


def resolve_source(ref: str) -> ModelSource:
    """A local folder, a catalog name (-> its hub id) or a hub id."""
    p = Path(ref).expanduser()
    if (p / "config.json").is_file():
        return ModelSource(ref, str(p.resolve()), True, has_weights(p))
    if p.exists() or ref.startswith((".", "/", "~")):
        raise FtlError(f"model = {ref!r}: {p} has no config.json; point 'model' at a folder saved with save_pretrained")
    try:
        key = catalog_index(models(), "hub_id").get(ref.lower())
        if key and models()[key].get("hub_id"):
            return ModelSource(ref, models()[key]["hub_id"], False, True)
    except Exception:  # noqa: BLE001 - the catalog is a convenience here; a hub id still loads
        pass
    return ModelSource(ref, ref, False, True)


def load_tokenizer(src: ModelSource):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(src.path)
    except (OSError, ValueError) as e:
        raise FtlError(f"model = {src.ref!r}: no usable tokenizer at {src.path} ({str(e).splitlines()[0][:200]}); "
                       "save one there with tokenizer.save_pretrained") from None
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise FtlError(f"model = {src.ref!r}: the tokenizer has neither a pad nor an eos token")
        tok.pad_token = tok.eos_token
        log.warning("the tokenizer has no pad token: padding with eos %r", tok.eos_token)
    return tok
