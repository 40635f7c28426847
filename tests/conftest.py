"""Shared fixtures: tiny model folders built from configs (random weights, no downloads)."""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("FTL_NO_GPU_DETECT", "1")
# No test may reach a real provider: no keys from the developer's environment or config, and the API
# base URLs point at a closed loopback port unless a test starts its own fake server.
for _k in ("RUNPOD_API_KEY", "LAMBDA_API_KEY", "HF_TOKEN"):
    os.environ.pop(_k, None)
os.environ["FTL_CONFIG_DIR"] = tempfile.mkdtemp(prefix="ftl-test-config.")
atexit.register(shutil.rmtree, os.environ["FTL_CONFIG_DIR"], True)
# ...nor write into the developer's cache (config.json copies, probed inventories, live prices)
os.environ["FTL_CACHE"] = tempfile.mkdtemp(prefix="ftl-test-cache.")
atexit.register(shutil.rmtree, os.environ["FTL_CACHE"], True)
os.environ.setdefault("FTL_RUNPOD_API_URL", "http://127.0.0.1:9")
os.environ.setdefault("FTL_LAMBDA_API_URL", "http://127.0.0.1:9")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

pytest_plugins = ["multinode"]  # session fixtures slurm_cluster, ssh_hosts (tests/multinode.py)

TINY = {
    "llama": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=256),
    "qwen2": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=256),
    "mistral": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=256),
    "mixtral": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=256, num_local_experts=4, num_experts_per_tok=2),
    "gemma2": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=32, vocab_size=256),
    "phi3": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=256, pad_token_id=0),
    "gpt2": dict(n_embd=64, n_layer=2, n_head=4, vocab_size=256, bos_token_id=0, eos_token_id=0),
    "bert": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=256),
    "distilbert": dict(dim=64, hidden_dim=128, n_layers=2, n_heads=4, vocab_size=256),
}


def tiny_config(model_type: str, **overrides):
    from transformers import AutoConfig

    return AutoConfig.for_model(model_type, **{**TINY[model_type], **overrides})


@pytest.fixture
def model_dir(tmp_path):
    """Factory: save a tiny config to a folder and return its path (config only, no weights)."""

    def make(model_type: str = "llama", **overrides) -> Path:
        d = tmp_path / f"{model_type}-{len(list(tmp_path.iterdir()))}"
        tiny_config(model_type, **overrides).save_pretrained(d)
        return d

    return make
