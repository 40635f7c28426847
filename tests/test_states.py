"""Model-state bytes (launcher/estimate/states.py) against the tensors the libraries really hold.

* NF4 weights: a tiny Llama loaded in 4 bit by bitsandbytes on the CPU, with and without double
  quantization, then prepared for k-bit training and wrapped with LoRA by the trainer's own code
  (launcher/train/model.py): the unique storages of every parameter, buffer and quant-state tensor
  equal the estimate's weights exactly.
* Gradients and optimizer state after one real step, for full, freeze, lora and qlora, with torch
  AdamW, bitsandbytes AdamW8bit / PagedAdamW8bit and SGD; and the foreach AdamW step temporary.
* Peer check against DeepSpeed's own model-state estimators for ZeRO-2 and ZeRO-3.
"""

from __future__ import annotations

import subprocess
import sys
import warnings
import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from launcher.estimate import states as S
from launcher.estimate.arch import arch_from_config
from launcher.estimate.params import plan_params
from launcher.estimate.states import state_bytes
from launcher.spec.recipe import recipe_from_dict
from tests.conftest import tiny_config

# q_proj 64x64 = 4096 elements (8-bit Adam state), k/v 32x64 = 2048 (32-bit), MLP 64x96, vocab 250
TINY = dict(intermediate_size=96, vocab_size=250, tie_word_embeddings=False)


def _recipe(model_dir, method: str, precision: str = "bf16", optimizer: str = "adamw", **kw):
    raw = {"name": "t", "model": str(model_dir), "method": method,
           "train": {"precision": precision, "optimizer": optimizer},
           "lora": {"r": 8, "alpha": 16, "target_modules": "all-linear"}}
    for k, v in kw.items():
        raw.setdefault(k, {}).update(v) if isinstance(v, dict) else raw.__setitem__(k, v)
    return recipe_from_dict(raw)


def _estimate(cfg, recipe, strategy="ddp", world=1):
    arch = arch_from_config(cfg.to_dict())
    return state_bytes(arch, plan_params(arch, recipe), recipe, strategy, world, max(1, world))


# ---------------------------------------------------------------------------------------------
# What a model holds


def _storage_key(t: torch.Tensor) -> tuple[int, int]:
    s = t.untyped_storage()
    return s.data_ptr(), s.nbytes()


def _quant_state_tensors(qs, out: list) -> None:
    """Every tensor inside a bitsandbytes QuantState, nested state2 included."""
    for v in vars(qs).values():
        if torch.is_tensor(v):
            out.append(v)
        elif type(v).__name__ == "QuantState":
            _quant_state_tensors(v, out)


def held_bytes(model: torch.nn.Module) -> int:
    """Unique storages of all parameters, buffers and 4-bit quant states (shared storages once)."""
    tensors = list(model.parameters()) + list(model.buffers())
    for m in model.modules():
        qs = getattr(getattr(m, "weight", None), "quant_state", None)
        if qs is not None:
            _quant_state_tensors(qs, tensors)
    return sum(dict(_storage_key(t) for t in tensors if t.untyped_storage().nbytes()).values())


def grad_bytes(model) -> int:
    return sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None)


def optimizer_bytes(opt) -> tuple[int, int]:
    """(state bytes on the device, 0-d host counters). Shared tensors (bnb's qmaps) count once."""
    seen: dict[int, int] = {}
    scalars = 0
    for st in opt.state.values():
        for v in st.values():
            if not torch.is_tensor(v):
                continue
            if v.dim() == 0:  # torch's `step` counter: a CPU scalar unless capturable/fused
                scalars += 1
                continue
            ptr, nb = _storage_key(v)
            seen[ptr] = nb
    return sum(seen.values()), scalars


class PeakNewBytes(TorchDispatchMode):
    """Peak bytes of tensor storages created inside the context and still alive (no allocator)."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, int] = {}
        self.cur = self.peak = 0

    def _free(self, ptr: int) -> None:
        self.cur -= self.live.pop(ptr, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {a.untyped_storage().data_ptr() for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                st = t.untyped_storage()
                ptr = st.data_ptr()
                if st.nbytes() and ptr not in inputs and ptr not in self.live:
                    self.live[ptr] = st.nbytes()
                    self.cur += st.nbytes()
                    self.peak = max(self.peak, self.cur)
                    weakref.finalize(st, self._free, ptr)
        return out


# ---------------------------------------------------------------------------------------------
# Models built the way ftl's trainer builds them


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny Llama saved with random bf16 weights (so from_pretrained can quantize it)."""
    from transformers import LlamaForCausalLM

    d = tmp_path_factory.mktemp("tiny-llama")
    cfg = tiny_config("llama", **TINY)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(d)
    return d, cfg


def build(model_dir, cfg, recipe):
    """The model as the trainer builds it (launcher/train/model.py): load_base in the method's dtype,
    prepare_for_method (freeze's trained modules, PEFT's k-bit preparation with its fp32 upcast undone,
    the LoRA config), the adapters; for qlora (and lora under bf16-pure) TRL's bf16 cast of the
    trainables and the trainer's cast_trainable after it (launcher/train/run.py)."""
    from launcher.train import model as M

    model = M.load_base(recipe, str(model_dir), None, device="cpu", strategy="ddp")
    model, peft_config = M.prepare_for_method(model, recipe)
    if peft_config is not None:
        model = M.attach_adapters(model, peft_config, recipe)
    if M.trl_casts_trainables(recipe):
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.to(torch.bfloat16)  # what TRL's SFTTrainer / DPOTrainer do
        M.cast_trainable(model, M.trained_dtype(recipe))
    return model


def make_optimizer(name, params, foreach=None):
    import bitsandbytes as bnb

    if name == "adamw":
        return torch.optim.AdamW(params, lr=1e-3, foreach=foreach)
    if name == "sgd":
        return torch.optim.SGD(params, lr=1e-3)
    cls = {"adamw_8bit": bnb.optim.AdamW8bit, "paged_adamw_8bit": bnb.optim.PagedAdamW8bit}[name]
    return cls(params, lr=1e-3)


def one_step(model, opt, precision):
    x = torch.randint(0, 250, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision not in ("fp32", "bf16-pure")):
        loss = model(input_ids=x, labels=x).loss
    loss.backward()
    grads = grad_bytes(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # paged optimizers warn that the CPU has no paging
        opt.step()
    return grads


# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("double_quant", [False, True])
def test_nf4_weights_equal_bitsandbytes_storage(tiny, double_quant):
    model_dir, cfg = tiny
    recipe = _recipe(model_dir, "qlora", quantization={"double_quant": double_quant})
    est = _estimate(cfg, recipe)
    model = build(model_dir, cfg, recipe)
    import bitsandbytes as bnb

    linear4 = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(linear4) == 7 * cfg.num_hidden_layers  # every Linear but lm_head

    # the 4-bit part alone: packed weights + every tensor of every quant state (nested included)
    q_tensors = [m.weight for m in linear4]
    for m in linear4:
        _quant_state_tensors(m.weight.quant_state, q_tensors)
    q_real = sum(dict(_storage_key(t) for t in q_tensors).values())
    q_est = est.detail["base weights (nf4)"] + est.detail["quantization constants"]
    # each Linear4bit owns its own code tables (no storage is shared between modules), so the
    # per-module constants the estimate counts are exactly what is held
    assert q_real == q_est, (q_real, q_est)
    if double_quant:
        assert all(m.weight.quant_state.absmax.dtype == torch.uint8 for m in linear4)

    # everything: NF4, bf16 embeddings/norms/lm_head (prepare_model_for_kbit_training's fp32 upcast
    # undone by the trainer, as lora holds them), fp32 LoRA adapters, rotary buffers
    assert held_bytes(model) == est.weights, (held_bytes(model), est.weights, est.detail)
    assert "base weights (fp32)" not in est.detail and est.detail["base weights (bf16)"] > 0
    rest = {n: p.dtype for n, p in model.named_parameters() if p.is_floating_point() and "lora_" not in n}
    assert set(rest.values()) == {torch.bfloat16}, rest
    assert any("embed_tokens" in n for n in rest) and any("lm_head" in n for n in rest) and any("norm" in n for n in rest)
    assert {p.dtype for n, p in model.named_parameters() if "lora_" in n} == {torch.float32}


CASES = [
    # method, precision, optimizer, extra recipe keys
    ("full", "fp32", "adamw", {}),
    ("full", "bf16", "adamw", {}),
    ("full", "bf16", "adamw_8bit", {}),
    ("full", "bf16", "sgd", {}),
    ("lora", "bf16", "adamw", {"lora": {"modules_to_save": ["lm_head"]}}),  # the copy trains in bf16
    ("lora", "bf16", "adamw_8bit", {}),
    ("lora", "bf16", "paged_adamw_8bit", {"lora": {"modules_to_save": ["lm_head"]}}),
    ("lora", "fp32", "adamw", {}),
    ("freeze", "bf16", "adamw", {"freeze": {"trainable_layers": 1}}),
    ("freeze", "bf16", "adamw_8bit", {"freeze": {"trainable_layers": 1}}),
    ("qlora", "bf16", "adamw", {}),
    ("qlora", "bf16", "paged_adamw_8bit", {}),
    ("qlora", "bf16", "adamw", {"lora": {"modules_to_save": ["lm_head"]}}),  # the copy trains in bf16, as lora's
    # bf16-pure: weights, gradients and AdamW moments in bf16 (8-bit states as ever)
    ("full", "bf16-pure", "adamw", {}),
    ("full", "bf16-pure", "adamw_8bit", {}),
    ("lora", "bf16-pure", "adamw", {"lora": {"modules_to_save": ["lm_head"]}}),
    ("freeze", "bf16-pure", "adamw", {"freeze": {"trainable_layers": 1}}),
    ("qlora", "bf16-pure", "adamw", {}),
]


@pytest.mark.parametrize("method,precision,optimizer,extra", CASES, ids=[f"{c[0]}-{c[1]}-{c[2]}" for c in CASES])
def test_gradients_and_optimizer_after_one_step(tiny, method, precision, optimizer, extra):
    model_dir, cfg = tiny
    recipe = _recipe(model_dir, method, precision, optimizer, **extra)
    est = _estimate(cfg, recipe)
    model = build(model_dir, cfg, recipe)
    params = [p for p in model.parameters() if p.requires_grad]
    assert sum(p.numel() for p in params) == plan_params(arch_from_config(cfg.to_dict()), recipe).trainable

    assert held_bytes(model) == est.weights, est.detail
    opt = make_optimizer(optimizer, params)
    grads = one_step(model, opt, precision)
    assert grads == est.detail["gradients"] == est.gradients, est.detail
    state, counters = optimizer_bytes(opt)
    assert state == est.optimizer, (state, est.detail)
    if optimizer == "adamw":
        assert counters == len(params)  # plus one 0-d fp32 `step` per tensor, kept on the host
    if "8bit" in optimizer:  # bnb's min_8bit_size=4096 rule decides per tensor, as the estimate does
        kinds = {v.dtype for st in opt.state.values() for k, v in st.items() if k == "state1"}
        assert (torch.uint8 in kinds) == any("8-bit adam state" in k for k in est.detail), est.detail
        assert (torch.float32 in kinds) == ("32-bit adam state (small tensors)" in est.detail), est.detail


@pytest.mark.parametrize("method,precision", [("full", "fp32"), ("lora", "bf16"), ("freeze", "bf16"), ("full", "bf16-pure")])
def test_foreach_adamw_step_temporary(tiny, method, precision):
    """torch AdamW(foreach=True), the default on GPUs, allocates one exp_avg_sq-sized tensor."""
    model_dir, cfg = tiny
    recipe = _recipe(model_dir, method, precision, "adamw", **({"freeze": {"trainable_layers": 1}} if method == "freeze" else {}))
    est = _estimate(cfg, recipe)
    model = build(model_dir, cfg, recipe)
    opt = make_optimizer("adamw", [p for p in model.parameters() if p.requires_grad], foreach=True)
    one_step(model, opt, precision)  # creates the state
    one_step(model, opt, precision)
    x = torch.randint(0, 250, (2, 8))
    model(input_ids=x, labels=x).loss.backward()
    with PeakNewBytes() as peak:
        opt.step()
    assert peak.peak == est.step_temp == est.detail["optimizer step temporaries"], (peak.peak, est.detail)


def test_sgd_has_no_state_and_no_temporary_without_weight_decay(tiny):
    model_dir, cfg = tiny
    est = _estimate(cfg, _recipe(model_dir, "full", "fp32", "sgd"))
    assert est.optimizer == 0 and est.step_temp == 0
    est_wd = _estimate(cfg, _recipe(model_dir, "full", "fp32", "sgd", train={"weight_decay": 0.1}))
    assert est_wd.step_temp == est.detail["gradients"]  # foreach SGD adds weight decay out of place


# ---------------------------------------------------------------------------------------------
# Peer check: DeepSpeed's own estimators (counts only; no model is built)

LLAMA_8B = dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False)


@pytest.mark.parametrize("gpus", [8, 16])
def test_zero2_agrees_with_deepspeed_estimator(gpus):
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    arch = arch_from_config(LLAMA_8B)
    r = recipe_from_dict({"name": "t", "model": "m", "method": "full", "train": {"precision": "bf16"}})
    s = state_bytes(arch, plan_params(arch, r), r, "zero2", gpus, 8)
    P = arch.params_total
    _, ds_gpu = estimate_zero2_model_states_mem_needs(P, num_gpus_per_node=8, num_nodes=gpus // 8, cpu_offload=False)
    # DeepSpeed: 2P (16-bit params) + 18P/N = 2 (16-bit grads) + 4 (fp32 grads) + 4 (master) + 8 (moments).
    # ftl lists the same tensors: the kept bf16 partition and the fp32 copy made at the step.
    mine = (s.detail["base weights (bf16)"] + s.optimizer + s.detail["gradient partition (bf16)"]
            + s.phases["step"]["fp32 gradient partition (step)"])
    rounding = 18 * gpus  # ceil(P/N) per partition
    assert abs(mine - ds_gpu) <= rounding, (mine, ds_gpu)
    # Deliberate difference: DeepSpeed 0.19.8 flattens the 16-bit partition (a second 2P/N copy)
    # before casting it to fp32, and torch's foreach AdamW adds 4P/N: the step peaks 2P/N higher.
    part = -(-P // gpus)
    assert s.step_temp == 2 * part
    assert s.weights + s.gradients + s.optimizer + s.step_temp - s.detail["buffers"] == pytest.approx(ds_gpu + 2 * part, abs=rounding)
    # with the optimizer offloaded DeepSpeed keeps only the 16-bit parameters on the GPU
    ro = recipe_from_dict({"name": "t", "model": "m", "method": "full", "parallel": {"offload": "optimizer"}})
    so = state_bytes(arch, plan_params(arch, ro), ro, "zero2", gpus, 8)
    _, ds_off = estimate_zero2_model_states_mem_needs(P, num_gpus_per_node=8, num_nodes=gpus // 8, cpu_offload=True)
    assert so.detail["base weights (bf16)"] == ds_off and so.optimizer == 0
    # host: master 4 + moments 8 + fp32 grads 4 + 16-bit staging 2 = 18P/N per rank, 8 ranks a node
    assert so.cpu == pytest.approx(18 * part * 8, abs=18 * 8)


@pytest.mark.parametrize("gpus", [8, 64])
def test_zero3_agrees_with_deepspeed_estimator(gpus):
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    arch = arch_from_config(LLAMA_8B)
    r = recipe_from_dict({"name": "t", "model": "m", "method": "full", "train": {"precision": "bf16"}})
    s = state_bytes(arch, plan_params(arch, r), r, "zero3", gpus, 8)
    P = arch.params_total
    largest = arch.vocab * arch.hidden  # DeepSpeed's "largest layer": the embedding / lm_head module
    _, ds_gpu, ds_largest = estimate_zero3_model_states_mem_needs(
        P, largest, num_gpus_per_node=8, num_nodes=gpus // 8, cpu_offload=False, cpu_offload_params=False)
    ds_sharded = ds_gpu - ds_largest  # 18P/N: 2 (16-bit params) + 4 (fp32 grads) + 4 (master) + 8 (moments)
    mine_sharded = (s.detail["base weights (bf16)"] + s.optimizer + s.detail["gradient partition (bf16)"]
                    + s.phases["step"]["fp32 gradient partition (step)"])
    part = sum(t.count * -(-t.numel // gpus) for t in S.inventory(arch, plan_params(arch, r), r))
    # Deliberate differences: DeepSpeed 0.19.8 also keeps a persistent 16-bit gradient partition
    # (grad_partitions_flat_buffer, measured in tests/test_sharding.py): +2P/N; and it makes the
    # fp32 gradient one optimizer sub-group (sub_group_size = 1e9 elements) at a time, where its
    # estimator counts 4P/N: at 8 GPUs P/N = 1.004e9 exceeds one sub-group.
    sub = min(part, S.DS_SUB_GROUP_SIZE)
    assert s.phases["step"]["fp32 gradient partition (step)"] == 4 * sub
    assert mine_sharded + 4 * (part - sub) - ds_sharded == pytest.approx(2 * part, abs=20 * 300), (mine_sharded, ds_sharded)
    # Gathered parameters: DeepSpeed budgets 4 bytes x the largest layer (two 16-bit copies);
    # ftl counts one 16-bit module (the same largest layer) plus the 16-bit prefetch bucket.
    assert s.gathered == 2 * (largest + S.ds_prefetch_bucket(arch))
    assert s.gathered <= ds_largest  # prefetch bucket (0.9 h^2) < largest layer (V h)


# ---------------------------------------------------------------------------------------------
# Invariants over the whole grid


def _grid():
    for method in ("full", "lora", "qlora", "freeze"):
        for precision in ("bf16", "fp32"):
            for strategy, world in (("ddp", 1), ("ddp", 4), ("zero1", 4), ("zero2", 4), ("zero3", 4), ("fsdp", 4)):
                for optimizer in ("adamw", "adamw_8bit", "paged_adamw_8bit", "sgd"):
                    for offload in ("none", "optimizer", "params"):
                        if offload != "none" and (strategy == "ddp" or optimizer != "adamw"):
                            continue
                        yield method, precision, strategy, world, optimizer, offload


def test_detail_lines_add_up_over_the_grid():
    arch = arch_from_config(LLAMA_8B)
    for method, precision, strategy, world, optimizer, offload in _grid():
        r = recipe_from_dict({"name": "t", "model": "m", "method": method,
                              "train": {"precision": precision, "optimizer": optimizer},
                              "parallel": {"offload": offload}})
        s = state_bytes(arch, plan_params(arch, r), r, strategy, world, 4)
        where = (method, precision, strategy, world, optimizer, offload)
        dev = sum(v for k, v in s.detail.items() if not k.startswith("host: "))
        assert dev == s.device_total, where
        assert sum(v for k, v in s.detail.items() if k.startswith("host: ")) == s.cpu, where
        assert (s.cpu > 0) == (offload != "none" and strategy != "ddp"), where
        assert s.gathered == s.detail.get("gathered layers (in flight)", 0), where
        assert 0 <= s.gradients_kept <= s.gradients and all(v > 0 for v in s.detail.values()), where
        if strategy in ("zero3", "fsdp") and offload == "none":
            ddp = state_bytes(arch, plan_params(arch, r), r, "ddp", 1, 1)
            assert s.weights - s.gathered < ddp.weights, where


def test_per_parameter_bytes_of_full_fine_tuning():
    """The headline figures of docs/estimation-states.md (persistent states, big model, 8 GPUs)."""
    arch = arch_from_config(LLAMA_8B)
    r = recipe_from_dict({"name": "t", "model": "m", "method": "full", "train": {"precision": "bf16"}})
    P, N = arch.params_total, 8
    plan = plan_params(arch, r)
    ddp1 = state_bytes(arch, plan, r, "ddp", 1, 1)
    assert ddp1.weights - ddp1.detail["buffers"] + ddp1.gradients + ddp1.optimizer == 16 * P
    ddp8 = state_bytes(arch, plan, r, "ddp", N, N)
    assert ddp8.gradients == 8 * P  # .grad plus the reducer's buckets (gradient_as_bucket_view=False)
    fsdp = state_bytes(arch, plan, r, "fsdp", N, N)
    shard = fsdp.detail["base weights (fp32)"]
    assert fsdp.gradients_kept == shard and fsdp.optimizer == 2 * shard  # 4 + 4 + 8 bytes per P/N


def test_states_module_does_not_import_torch():
    code = ("import sys, launcher.estimate.states; "
            "bad = [m for m in ('torch', 'transformers', 'bitsandbytes', 'deepspeed') if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=str(S.__file__).rsplit("/launcher/", 1)[0])
    assert res.returncode == 0, res.stdout + res.stderr


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "mixtral", "gemma2", "phi3", "gpt2", "bert", "distilbert"])
def test_inventory_matches_the_parameter_plan(model_type):
    """The per-tensor inventory (what 8-bit thresholds and FSDP shards see) adds up to ParamPlan."""
    cfg = tiny_config(model_type).to_dict()
    task = "classification" if model_type in ("bert", "distilbert") else "sft"
    head = "seq_cls" if task == "classification" else "causal_lm"
    for method, extra in (("full", {}), ("freeze", {"freeze": {"trainable_layers": 1}}),
                          ("lora", {}), ("qlora", {}), ("lora", {"lora": {"modules_to_save": ["lm_head", "score"]}})):
        if method == "qlora" and head == "seq_cls":
            continue
        raw = {"name": "t", "model": "m", "method": method, "task": task, **extra}
        r = recipe_from_dict(raw)
        arch = arch_from_config(cfg, head, r.num_labels)
        plan = plan_params(arch, r)
        inv = S.inventory(arch, plan, r)
        assert sum(t.count * t.numel for t in inv) == plan.total + plan.adapter + plan.saved_copies, (model_type, method)
        assert sum(t.count * t.numel for t in inv if t.trainable) == plan.trainable, (model_type, method)
        assert sum(t.count * t.numel for t in inv if t.quantized) == plan.quantized_weights, (model_type, method)
        for strategy in ("ddp", "zero2", "zero3", "fsdp"):
            s = state_bytes(arch, plan, r, strategy, 4, 4)
            assert s.device_total > 0
