"""Catalog entries of current checkpoints held to the parameter counts their publishers state (issue 12).

Every entry after the catalog's first seventeen carries `source` (where and when its config.json was
read) and `published_params`: the count as its publisher writes it ("8.2B"), a tolerance of half a unit
of the last digit written ("0.05B": how the publisher rounds), what the count covers, and where it was
read. The estimate is ftl's own, built as `ftl estimate` builds it: the analytic builder of a supported
family, else the architecture probed from the model on the meta device (launcher/estimate/probed.py).
No network: the configs are the catalog's.
"""

from __future__ import annotations

import re
from decimal import Decimal

import pytest

from launcher.estimate.arch import SUPPORTED, Arch, arch_from_config
from launcher.estimate.probed import probe_arch
from launcher.spec.catalog import models

# The first entries, checked exactly against their safetensors counts (tests/test_arch.py,
# bench/catalog_param_counts.py) before entries carried their sources as data.
LEGACY = {
    "llama-3.2-1b", "llama-3.2-3b", "llama-3.1-8b", "llama-3.1-70b", "llama-3.1-405b", "mistral-7b",
    "mixtral-8x7b", "qwen2.5-0.5b", "qwen2.5-7b", "qwen2.5-72b", "gemma-2-2b", "gemma-2-9b", "gemma-2-27b",
    "phi-3-mini", "gpt2", "bert-base", "distilbert-base",
}
UNITS = {"K": 10**3, "M": 10**6, "B": 10**9, "T": 10**12}
COUNT = re.compile(r"^(\d+(?:\.\d+)?)([KMBT])$")
PUBLISHED = sorted(k for k, e in models().items() if e.get("published_params"))


def count(text: str) -> Decimal:
    """'8.2B' -> 8200000000 (as the publisher writes it: digits and a unit)."""
    m = COUNT.match(str(text).strip())
    assert m, f"{text!r}: not a count like 8.2B or 149M"
    return Decimal(m.group(1)) * UNITS[m.group(2)]


def half_unit(text: str) -> Decimal:
    """Half a unit of the last digit written: '8.2B' -> 0.05B, '235B' -> 0.5B, '0.6B' -> 0.05B."""
    digits = COUNT.match(str(text).strip()).group(1)
    decimals = len(digits.split(".")[1]) if "." in digits else 0
    return Decimal(1).scaleb(-decimals) / 2 * UNITS[str(text).strip()[-1]]


def within(estimated: int, stated: str, tolerance: str) -> bool:
    return abs(Decimal(estimated) - count(stated)) <= count(tolerance)


def estimate(cfg: dict) -> Arch:
    """ftl's inventory of a causal LM's config, as the estimator builds it."""
    if cfg["model_type"] in SUPPORTED:
        return arch_from_config(cfg, "causal_lm")
    return probe_arch(cfg, "causal_lm", 2)


def non_embedding(arch: Arch) -> int:
    """Total less the token embedding and an untied output embedding (the publishers' 'non-embedding')."""
    return arch.params_total - arch.block("embeddings").other.get("embed_tokens", 0) - arch.block("head").params


@pytest.mark.parametrize("key", PUBLISHED)
def test_estimate_is_the_published_count(key):
    pub = models()[key]["published_params"]
    arch = estimate(models()[key]["config"])
    assert within(arch.params_total, pub["stated"], pub["tolerance"]), (
        f"{key}: ftl estimates {arch.params_total:,} parameters; {pub['source']} states {pub['stated']} "
        f"(± {pub['tolerance']}, {pub['covers']})")
    if pub.get("stated_non_embedding"):
        n = non_embedding(arch)
        assert within(n, pub["stated_non_embedding"], pub["tolerance_non_embedding"]), (
            f"{key}: {n:,} non-embedding parameters; stated {pub['stated_non_embedding']}")


@pytest.mark.parametrize("key", PUBLISHED)
def test_tolerance_is_the_publishers_rounding(key):
    """No loose bound: at most half a unit of the last digit the publisher wrote."""
    pub = models()[key]["published_params"]
    for stated, tol in (("stated", "tolerance"), ("stated_non_embedding", "tolerance_non_embedding")):
        if pub.get(stated):
            assert count(pub[tol]) <= half_unit(pub[stated]), (key, pub[stated], pub[tol])


def test_every_new_entry_carries_its_sources_and_count():
    new = [k for k in models() if k not in LEGACY]
    assert new, "no catalog entry beyond the first seventeen"
    for key in new:
        e = models()[key]
        src, pub = e.get("source") or {}, e.get("published_params") or {}
        assert str(src.get("config", "")).startswith("https://"), f"{key}: source.config (where config.json was read)"
        for what, d in (("source", src), ("published_params", pub)):
            assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", str(d.get("read", ""))), f"{key}: {what}.read (the date it was read)"
        for field in ("stated", "tolerance", "covers", "source"):
            assert pub.get(field), f"{key}: published_params.{field}"
        assert e.get("hub_id") and e.get("aliases"), f"{key}: hub_id and aliases"


def test_the_check_fails_on_a_wrong_count():
    """The same comparison rejects a count one rounding step off (and a misread config)."""
    arch = estimate(models()["qwen3-8b"]["config"])
    assert within(arch.params_total, "8.2B", "0.05B")
    assert not within(arch.params_total, "8.3B", "0.05B")
    assert not within(arch.params_total, "8.1B", "0.05B")
    wrong = dict(models()["qwen3-8b"]["config"], tie_word_embeddings=True)  # drops the 0.62B lm_head
    assert not within(estimate(wrong).params_total, "8.2B", "0.05B")


def test_rounding_rule():
    assert half_unit("8.2B") == Decimal("0.05") * 10**9
    assert half_unit("0.6B") == Decimal("0.05") * 10**9
    assert half_unit("235B") == Decimal("0.5") * 10**9
    assert half_unit("6.95B") == Decimal("0.005") * 10**9
    assert count("149M") == 149 * 10**6


def test_ftl_models_lists_a_family_without_an_analytic_builder(monkeypatch):
    """`ftl models` counts an entry of a probed family (here a tiny Gemma 3 text config) from the model itself."""
    import json

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    from typer.testing import CliRunner

    from launcher.cli import commands

    tiny = dict(model_type="gemma3_text", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=256)
    assert tiny["model_type"] not in SUPPORTED
    monkeypatch.setattr(commands, "catalog_models", lambda: {"tiny-gemma3": {"hub_id": None, "config": tiny}})
    res = CliRunner().invoke(commands.app, ["models", "--json"])
    assert res.exit_code == 0, res.output
    row = json.loads(res.stdout[res.stdout.index("["):])[0]
    d = dict(tiny)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(d.pop("model_type"), **d))
    assert row["name"] == "tiny-gemma3" and row["layers"] == 2
    assert row["params"] == sum(p.numel() for p in model.parameters())
