"""The tensor inventory equals what transformers builds: every catalog entry and every family/head."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

from launcher.spec.catalog import models
from launcher.estimate.arch import SUPPORTED, ArchError, arch_from_config
from launcher.estimate.probed import probe_arch
from tests.conftest import TINY, tiny_config

ENCODERS = {"bert", "distilbert"}


def meta_params(cfg, cls) -> int:
    with torch.device("meta"):
        model = cls.from_config(cfg)
    return sum(p.numel() for p in model.parameters())  # parameters() de-duplicates tied weights


@pytest.mark.parametrize("key", sorted(models()))
def test_catalog_params_total_equals_meta_model(key):
    cfg_dict = dict(models()[key]["config"])
    cfg = AutoConfig.for_model(cfg_dict.pop("model_type"), **cfg_dict)
    if cfg.model_type in ENCODERS:
        arch = arch_from_config(models()[key]["config"], "seq_cls", 2)
        assert arch.params_total == meta_params(cfg, AutoModelForSequenceClassification)
        # and the bare encoder, as published: sequence classification adds pooler/pre-classifier + classifier
        head = arch.block("head").params + (arch.block("final").params if cfg.model_type == "distilbert" else 0)
        assert arch.params_total - head == meta_params(cfg, AutoModel)
    else:  # a family without an analytic builder: the estimator's probe of the model itself
        c = models()[key]["config"]
        arch = arch_from_config(c, "causal_lm") if c["model_type"] in SUPPORTED else probe_arch(c, "causal_lm", 2)
        assert arch.params_total == meta_params(cfg, AutoModelForCausalLM)


@pytest.mark.parametrize("model_type", sorted(TINY))
@pytest.mark.parametrize("head", ["causal_lm", "seq_cls"])
def test_every_family_and_head(model_type, head):
    if model_type in ENCODERS and head == "causal_lm":
        with pytest.raises(ArchError, match="classification"):
            arch_from_config(tiny_config(model_type).to_dict(), head)
        return
    cfg = tiny_config(model_type, num_labels=3)
    cls = AutoModelForCausalLM if head == "causal_lm" else AutoModelForSequenceClassification
    assert arch_from_config(cfg.to_dict(), head, 3).params_total == meta_params(cfg, cls)


def test_tied_embeddings_counted_once():
    tied = arch_from_config(tiny_config("llama", tie_word_embeddings=True).to_dict())
    untied = arch_from_config(tiny_config("llama", tie_word_embeddings=False).to_dict())
    assert untied.params_total - tied.params_total == 256 * 64


def test_moe_active_parameters():
    a = arch_from_config(models()["mixtral-8x7b"]["config"])
    assert a.params_total == 46_702_792_704
    # 2 of 8 experts per token: the published "12.9B active"
    assert 12.8e9 < a.params_active < 13.0e9


def test_unknown_model_type_names_supported_ones():
    with pytest.raises(ArchError, match="supported: .*llama"):
        arch_from_config({"model_type": "t5"})
