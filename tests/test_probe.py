"""The architecture probe (launcher/train/probe.py, launcher/estimate/probed.py) held to the model itself.

* parameters: for a fixed sample of causal-LM types (default config.json of each, full size, on the
  meta device), the estimator's blocks and its sharding inventory hold exactly the model's numel;
* LoRA: the trainable count equals PEFT's on the meta model given the estimator's target list, and
  all-linear is PEFT's own less routers (and what PEFT refuses on state-space models);
* activations: what the probe's fake step predicts for the body is what a real CPU step of the same
  tiny model saves (tests/live_bytes.py), for 20+ types outside the analytic families;
* FLOPs: the probe's figures equal FlopCounterMode on a real CPU step (matmuls; the CPU SDPA kernel,
  which the counter does not see, aside);
* two paths: for the analytic families, the probe and the analytic path agree (see TWO_PATHS);
* the CLI: a folder with only config.json is estimated, probed once, then read from the cache.
`bench/arch_coverage.py` runs the parameter sweep over every causal-LM type.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import LoraConfig
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoConfig, AutoModelForCausalLM

from launcher.core.errors import FtlError
from launcher.estimate import probed
from launcher.estimate.activations import activation_bytes
from launcher.estimate.arch import arch_from_config
from launcher.estimate.flops import flops_per_sequence
from launcher.estimate.params import peft_target_modules, plan_params
from launcher.estimate.states import inventory
from launcher.train import probe
from launcher.train.adapters import lora_model
from live_bytes import SavedTensors
from probe_kit import build_real, probed_arch, recipe, tiny_config

ROOT = Path(__file__).resolve().parent.parent

# Causal-LM types probed in the suite (bench/arch_coverage.py sweeps all of them): the ones the issue
# names, then a spread of others. Default config.json of each, full size.
SAMPLE = [
    "gemma3_text", "qwen2", "qwen3_moe", "qwen3_next", "gpt_oss", "deepseek_v2", "deepseek_v3", "llama4_text",
    "phi", "phimoe", "falcon", "gpt_neox", "gptj", "opt", "bloom", "starcoder2", "olmo", "olmoe", "cohere",
    "stablelm", "granite", "granitemoe", "smollm3", "glm4", "exaone4", "ernie4_5", "jamba", "mamba",
    "mamba2", "falcon_h1", "codegen", "gpt_bigcode", "recurrent_gemma", "zamba2", "lfm2", "helium",
]
# Tiny models whose real CPU step the probe is held to (20+ outside the analytic families: two MoE and
# more, state-space and hybrid, local/global attention, multi-head latent attention)
STEP_TYPES = [
    "gemma3_text", "qwen3_moe", "olmoe", "gpt_oss", "deepseek_v2", "deepseek_v3", "llama4_text",
    "mamba", "jamba", "qwen3_next", "falcon", "gpt_neox", "gptj", "opt", "bloom", "starcoder2", "olmo",
    "cohere", "stablelm", "granite", "granitemoe", "smollm3", "glm4", "exaone4", "ernie4_5", "phi",
]
# Not held: Phi-MoE, whose experts run transformers' eager per-expert loop (it cannot dispatch the
# grouped matmul): which tokens reach which expert is data, and fake tensors have none (+25% at 2 x 64
# tokens on the tiny model; docs/estimation.md).
ACT_TOLERANCE = 0.10  # the bound; most types are exact, MoE routing moves a few percent


def _meta_numel(cfg: dict) -> int:
    d = dict(cfg)
    mt = d.pop("model_type")
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(mt, **d))
    return sum(p.numel() for p in model.parameters())


def test_inventory_holds_every_parameter_of_the_sample():
    """params_total, the blocks and the sharding inventory against the meta model's numel."""
    wrong = []
    full = recipe("full")
    for mt in SAMPLE:
        cfg = AutoConfig.for_model(mt).to_dict()
        ans = probe.answer({"config": cfg, "head": "causal_lm"})
        assert "error" not in ans, (mt, ans)
        arch = probed.arch_from_inventory(ans, cfg, "causal_lm", 2)
        numel = _meta_numel(cfg)
        states = sum(t.numel * t.count for t in inventory(arch, plan_params(arch, full), full))
        if not (arch.params_total == numel == states):
            wrong.append(f"{mt}: meta {numel}, params_total {arch.params_total}, sharding inventory {states}")
    assert not wrong, "\n".join(wrong)


def test_moe_active_parameters_count_the_routed_experts():
    cfg = AutoConfig.for_model("qwen3_moe").to_dict()  # 128 experts, 8 per token
    arch = probed.arch_from_inventory(probe.answer({"config": cfg, "head": "causal_lm"}), cfg, "causal_lm", 2)
    routed = sum(b.count * b.expert_params for b in arch.layer_blocks)
    assert routed and arch.params_active == arch.params_total - routed * (128 - 8) // 128


@pytest.mark.parametrize("mt", ["gemma3_text", "qwen3_moe", "falcon", "gpt_neox", "opt", "bloom", "phi", "mamba",
                                "deepseek_v3", "gpt_bigcode", "starcoder2"])
def test_lora_trainable_count_is_peft_s(mt):
    cfg = tiny_config(mt)
    r = recipe("lora")
    arch, _ = probed_arch(cfg, [])
    params = plan_params(arch, r)
    d = dict(cfg)
    d.pop("model_type")
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(mt, **d))
    peft = lora_model(model, LoraConfig(r=8, target_modules=peft_target_modules(params)), adapter_fp32=True)
    assert params.trainable == sum(p.numel() for p in peft.parameters() if p.requires_grad)
    # all-linear is PEFT's: every Linear / Conv1D but the output layer (less MoE routers and, on
    # state-space models, what PEFT refuses)
    names = {l.name for _, l in params.lora_targets}
    assert "lm_head" not in names and names


def test_misspelt_lora_target_lists_the_real_modules():
    arch, _ = probed_arch(tiny_config("gpt_neox"), [])
    with pytest.raises(FtlError, match=r"'q_proj' is not a Linear module of gpt_neox; its Linear modules: query_key_value, dense"):
        plan_params(arch, recipe("lora", targets=["q_proj"]))
    with pytest.raises(FtlError, match="q_prj.*its Linear modules: q_proj, k_proj"):
        plan_params(arch_from_config(tiny_config("llama")), recipe("lora", targets=["q_prj"]))


def _real_body_saved(cfg, arch, params, r) -> int:
    model, body, cd = build_real(cfg, arch, params, r)
    ids = torch.randint(0, arch.vocab, (r.train.micro_batch_size, r.data.max_seq_len))
    st = SavedTensors(model=model)
    with torch.autocast("cpu", dtype=cd, enabled=r.train.precision in ("bf16", "fp16")), st():
        out = body(input_ids=ids, use_cache=False).last_hidden_state
    saved = st.activations  # while `out` holds the graph (a freed storage leaves the record)
    del out
    return saved


@pytest.mark.parametrize("mt", STEP_TYPES)
def test_activations_match_a_real_cpu_step(mt):
    """The body's saved bytes at (b=2, s=4L), fitted from the probe's runs at L and 2L, against a real
    step of the same tiny model: LoRA in bf16 and full in bf16 mixed precision."""
    cfg = tiny_config(mt)
    length = probed.probe_shapes(cfg)[0][1]
    recipes = [recipe("lora", s=4 * length), recipe("full", s=4 * length)]
    arch, ans = probed_arch(cfg, recipes)
    for r in recipes:
        params = plan_params(arch, r)
        key, _ = probed.variant(arch, params, r)
        runs = ans["measurements"][key]["runs"]
        b, s = r.train.micro_batch_size, r.data.max_seq_len
        per_layer, outside = probed.saved_at(runs, b, s)
        predicted = sum(per_layer) + outside
        real = _real_body_saved(cfg, arch, params, r)
        assert abs(predicted - real) <= ACT_TOLERANCE * real, (mt, r.method, predicted, real)


def _grouped_mm(*args, out_shape=None, **kwargs):
    return probe._grouped_mm_flops(*args, out_shape=out_shape, **kwargs)


@pytest.mark.parametrize("mt", ["gemma3_text", "qwen3_moe", "gpt_neox", "mamba", "deepseek_v3", "opt"])
def test_flops_match_the_flop_counter(mt, monkeypatch):
    """forward + backward of a real CPU step under FlopCounterMode (fused experts counted by the probe's
    formula, which the counter lacks) against the estimate, attention aside (the counter does not see
    the CPU SDPA kernel; the probe counts it as the counter counts the CUDA kernels)."""
    cfg = tiny_config(mt)
    rs = [recipe("lora", b=1, s=64), recipe("full", b=1, s=64)]
    arch, ans = probed_arch(cfg, rs)
    monkeypatch.setattr(probed, "_load", lambda *a, **k: ("", ans))
    for r in rs:
        params = plan_params(arch, r)
        est = flops_per_sequence(arch, params, r)
        model, _, cd = build_real(cfg, arch, params, r)
        ids = torch.randint(0, arch.vocab, (1, 64))
        counter = FlopCounterMode(display=False, custom_mapping={torch.ops.aten._grouped_mm: _grouped_mm})
        with counter, torch.autocast("cpu", dtype=cd):
            model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        real = counter.get_total_flops()
        assert abs((est.total - est.attention) - real) <= 0.05 * real, (mt, r.method, est.total - est.attention, real)


# The two paths on the analytic families' tiny configs (item 6): parameters and trainable counts equal,
# FLOPs and activations within these bounds. LoRA, QLoRA and pure bf16 agree to the byte on the dense
# families; full fine-tuning under autocast differs by the CPU autocast policy the probe runs under
# (a few fp32 copies the CUDA policy does not make); checkpointing by the recomputed layer's last
# product (the analytic path knows PyTorch stops before it). MoE (Mixtral) is not held: the analytic
# model and the real CPU step differ there (docs/estimation.md).
TWO_PATHS = {("lora", "bf16", False): 0.01, ("qlora", "bf16", False): 0.01, ("full", "bf16", False): 0.05,
             ("full", "bf16-pure", True): 0.05}


@pytest.mark.parametrize("mt", ["llama", "qwen2", "qwen3", "gemma2", "phi3"])
def test_two_paths_agree(mt, monkeypatch):
    cfg = tiny_config(mt)
    cases = {k: recipe(k[0], k[1], checkpointing=k[2], task="sft", s=256) for k in TWO_PATHS}
    parch, ans = probed_arch(cfg, list(cases.values()))
    monkeypatch.setattr(probed, "_load", lambda *a, **k: ("", ans))
    aarch = arch_from_config(cfg)
    assert parch.params_total == aarch.params_total
    for k, r in cases.items():
        pp, ap = plan_params(parch, r), plan_params(aarch, r)
        assert pp.trainable == ap.trainable, k
        pa, aa = activation_bytes(parch, pp, r), activation_bytes(aarch, ap, r)
        assert abs(pa.saved - aa.saved) <= TWO_PATHS[k] * aa.saved, (k, pa.saved, aa.saved)
        pf, af = flops_per_sequence(parch, pp, r), flops_per_sequence(aarch, ap, r)
        assert abs(pf.total - af.total) <= max(0.01, TWO_PATHS[k]) * af.total, (k, pf.total, af.total)


def test_missing_torch_is_named(monkeypatch):
    monkeypatch.setattr(probed.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(probed.ProbeError, match="needs torch and transformers"):
        probed.probe_arch({"model_type": "gemma3_text"}, "causal_lm", 2)


def test_cli_probes_a_config_only_folder_once(tmp_path):
    """ftl estimate on a folder holding only config.json: the first run probes (and says so), the second
    reads the cache; the parameter count is the model's."""
    cfg = tiny_config("gemma3_text")
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    env = dict(os.environ, FTL_CACHE=str(tmp_path / "cache"))
    cmd = [sys.executable, "-m", "launcher.cli", "estimate", str(ROOT / "recipes" / "quickstart.yaml"),
           "--set", f"model={tmp_path / 'm'}", "--json"]
    first = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert first.returncode == 0, first.stderr
    assert "probing its architecture for model_type 'gemma3_text' once" in first.stderr
    assert first.stderr.count("probing") == 1  # the recipe's variants came with the inventory
    files = list((tmp_path / "cache" / "inventories").glob("gemma3_text-*.json"))
    assert len(files) == 1
    est = json.loads(first.stdout)
    assert est["model"]["params_total"] == _meta_numel(cfg)
    assert est["model"]["arch_source"] == "probe" and est["model"]["probe_cache"] == str(files[0])
    second = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert second.returncode == 0 and "probing" not in second.stderr
    assert json.loads(second.stdout)["per_device"] == est["per_device"]


def test_unbuildable_config_is_one_clear_error(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps({"model_type": "gemma3_text", "hidden_size": 64,
                                                             "num_attention_heads": 3, "head_dim": 0}))
    env = dict(os.environ, FTL_CACHE=str(tmp_path / "cache"))
    res = subprocess.run([sys.executable, "-m", "launcher.cli", "estimate", str(ROOT / "recipes" / "quickstart.yaml"),
                          "--set", f"model={tmp_path / 'm'}"], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert res.returncode != 0 and "Traceback" not in res.stderr
    assert "gemma3_text" in res.stderr


@pytest.mark.slow
@pytest.mark.parametrize("mt", ["gemma3_text", "gpt_neox", "falcon", "opt", "starcoder2"])
def test_peak_of_a_probed_step_matches_live_bytes(mt, monkeypatch):
    """The phase peak of a real CPU step (tests/live_bytes.py LiveBytes: forward, backward, AdamW step)
    against the estimate's phases for a probed architecture, LoRA on the full logits (DAPT), within the
    analytic families' tolerance."""
    import live_bytes as lb
    from test_activations import TOL_PEAK, predicted_phases

    cfg = tiny_config(mt, layers=4)
    r = recipe("lora", b=2, s=128)
    arch, ans = probed_arch(cfg, [r])
    monkeypatch.setattr(probed, "_load", lambda *a, **k: ("", ans))
    params = plan_params(arch, r)
    pred = activation_bytes(arch, params, r, device="cpu")
    d = dict(cfg)
    d.pop("model_type")
    _, v = probed.variant(arch, params, r)
    setup = lb.build(AutoConfig.for_model(mt, **d), method="lora", precision="bf16", attn=probe.PROBE_ATTENTION,
                     micro_batch=2, seq=128, lora_dropout=0.0, targets=v["lora_targets"])
    weights, grads = lb.param_bytes(setup.model), lb.grad_bytes(setup.model)
    trace = lb.measure_step(setup, layer_phases=True)
    opt_states = sum(t.numel() * t.element_size() for st in trace.optimizer.state.values()
                     for t in st.values() if isinstance(t, torch.Tensor) and t.dim() > 0)
    phases = predicted_phases(pred, weights, grads, opt_states, grads)
    ratio = max(phases.values()) / trace.peak
    print(f"{mt}: predicted peak {max(phases.values())} ({max(phases, key=phases.get)}), measured {trace.peak} "
          f"({trace.peak_phase}), ratio {ratio:.3f}")
    assert abs(ratio - 1) <= TOL_PEAK, (mt, phases, trace.peak, dict(trace.phase_peaks))


@pytest.mark.parametrize("mt", ["roberta", "xlm-roberta", "modernbert", "electra", "qwen3", "gemma3_text"])
def test_classification_activations_match_a_real_cpu_step(mt):
    """Sequence classification (item 4): the encoders people fine-tune for it and decoders with a score
    head; the whole model's saved bytes, head and loss included, against a real CPU step (LoRA)."""
    cfg = tiny_config(mt)
    length = probed.probe_shapes(cfg)[0][1]
    r = recipe("lora", s=4 * length, head="seq_cls")
    arch, ans = probed_arch(cfg, [r], head="seq_cls")
    params = plan_params(arch, r)
    key, _ = probed.variant(arch, params, r)
    runs = ans["measurements"][key]["runs"]
    b, s = r.train.micro_batch_size, r.data.max_seq_len
    per_layer, outside = probed.saved_at(runs, b, s)
    predicted = sum(per_layer) + outside
    model, _, cd = build_real(cfg, arch, params, r, head="seq_cls")
    ids = torch.randint(0, arch.vocab, (b, s))
    st = SavedTensors(model=model)
    with torch.autocast("cpu", dtype=cd), st():
        loss = model(input_ids=ids, labels=torch.zeros(b, dtype=torch.long)).loss
    real = st.activations
    del loss
    assert abs(predicted - real) <= ACT_TOLERANCE * real, (mt, predicted, real)
