"""The architecture probe: what a transformers model holds and what one training step saves and computes,
taken from the model itself, for architectures the estimator has no analytic builder for.

`python -m launcher.train.probe < request.json > answer.json` (the protocol: launcher/estimate/probed.py,
which runs this in a subprocess and caches the answer, so `ftl estimate` itself never imports torch).

* inventory: the model built from config.json on torch's `meta` device (no weights, no memory): every
  parameter (path, shape, owning module), every Linear-like module (nn.Linear, GPT-2's Conv1D), the input
  and output embeddings, the repeated layer list, buffers, and mixture-of-experts facts.
* measure: one forward and backward of the model under `FakeTensorMode` (CPU fake tensors: shapes and
  dtypes, no data) for each requested variant (method, precision, LoRA, freeze, attention), at three
  (batch, sequence) shapes so that per-sequence linear, quadratic and batch-shared terms separate:
  the storages autograd saves (per layer and outside the layers; each storage once), autocast's
  weight copies apart, and the matmul FLOPs of `FlopCounterMode` forward, backward and per layer.
  Attention runs through a probe kernel registered in transformers' AttentionInterface that saves
  what CUDA's flash / memory-efficient SDPA saves (q, k, v, the output and an fp32 log-sum-exp, no
  s x s scores) and counts the FLOP counter's figures for it, so the CPU's math path never stands in
  for the GPU's kernel.
"""

from __future__ import annotations

import json
import re
import sys
import warnings
from contextlib import ExitStack
from typing import Any

import torch
import transformers
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils.flop_counter import FlopCounterMode
from transformers import AttentionInterface, AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification
from transformers.masking_utils import AttentionMaskInterface
from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES
from transformers.pytorch_utils import Conv1D

from launcher.estimate.params import plan_params
from launcher.estimate.probed import arch_from_inventory, variant
from launcher.spec.recipe import Recipe
from launcher.train.adapters import lora_model

# config.json keys that name the routed experts per MoE layer, and how many a token uses
EXPERT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts", "num_experts_total")
TOP_K_KEYS = ("num_experts_per_tok", "num_experts_per_token", "moe_top_k", "top_k", "experts_per_token",
              "num_selected_experts", "moe_k")
ROUTED = re.compile(r"(^|\.)experts\.")
SHARED = re.compile(r"shared_expert")
# (batch, sequence) shapes of the measurement unless the request names them (launcher.estimate.probed
# probe_shapes): batch 2 minus batch 1 is what each sequence adds, at two lengths to separate s from
# s^2; batch 1 minus that is what the batch shares (rotary tables, masks)
SHAPES = ((1, 16), (1, 32), (2, 16), (2, 32))
PROBE_ATTENTION = "ftl_probe"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "bf16-pure": torch.bfloat16}


LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")


def _config(request: dict[str, Any], layers: int | None = None):
    """The transformers config of the request; `layers` keeps only the first that many layers (the
    layer count and every per-layer list of config.json cut to it)."""
    d = dict(request["config"])
    mt = d.pop("model_type")
    cfg = AutoConfig.for_model(mt, **d)
    if layers is not None:
        for owner in (cfg, getattr(cfg, "text_config", None)):
            if owner is None:
                continue
            n = next((getattr(owner, k) for k in LAYER_KEYS if isinstance(getattr(owner, k, None), int)), None)
            if n is None:
                continue
            for k in LAYER_KEYS:
                if getattr(owner, k, None) == n:
                    setattr(owner, k, layers)
            for k, val in list(owner.to_dict().items()):
                if isinstance(val, list) and len(val) == n:
                    setattr(owner, k, val[:layers])
    if request.get("head") == "seq_cls":
        cfg.num_labels = int(request.get("num_labels", 2))
        if getattr(cfg, "pad_token_id", None) is None:
            cfg.pad_token_id = 0  # decoder classification picks the last non-pad token
    return cfg


def _model_class(head: str):
    return AutoModelForSequenceClassification if head == "seq_cls" else AutoModelForCausalLM


def _first(cfg, keys: tuple[str, ...]) -> int:
    for owner in (cfg, getattr(cfg, "text_config", None)):
        for k in keys:
            v = getattr(owner, k, None) if owner is not None else None
            if isinstance(v, int) and not isinstance(v, bool) and v > 0:
                return v
    return 0


def _layer_list(model: nn.Module) -> tuple[str, nn.ModuleList] | None:
    """The repeated block list: the ModuleList holding the most parameters (decoder or encoder layers)."""
    best = None
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > 0:
            n = sum(p.numel() for p in mod.parameters())
            if best is None or n > best[0]:
                best = (n, name, mod)
    return (best[1], best[2]) if best else None


def _linear_dims(mod: nn.Module) -> tuple[int, int] | None:
    if isinstance(mod, Conv1D):
        return mod.weight.shape[0], mod.weight.shape[1]
    if isinstance(mod, nn.Linear):
        return mod.in_features, mod.out_features
    return None


def inventory_of(model: nn.Module, cfg) -> dict[str, Any]:
    """The compact inventory launcher.estimate.probed turns into an Arch (see its docstring)."""
    names = {id(m): n for n, m in model.named_modules()}
    owner: dict[int, str] = {}
    for mname, mod in model.named_modules():
        for pname, p in mod.named_parameters(recurse=False):
            owner.setdefault(id(p), mname)
    params, seen, tied = [], {}, []
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            tied.append([name, seen[id(p)]])
            continue
        seen[id(p)] = name
        params.append({"name": name, "shape": list(p.shape), "module": owner.get(id(p), "")})
    linears = []
    for name, mod in model.named_modules():
        dims = _linear_dims(mod)
        if dims:
            bias = getattr(mod, "bias", None)
            linears.append({"name": name, "in": int(dims[0]), "out": int(dims[1]),
                            # a weight or bias tied to another module's is counted there
                            "weight_owned": owner.get(id(mod.weight)) == name,
                            "bias": bias is not None and owner.get(id(bias)) == name, "conv1d": isinstance(mod, Conv1D)})
    buffers, bseen = 0, set()
    for _, b in model.named_buffers():
        if id(b) not in bseen:
            bseen.add(id(b))
            buffers += b.numel() * b.element_size()
    layers = _layer_list(model)
    emb = model.get_input_embeddings()
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return {
        "model_class": type(model).__name__,
        # an encoder (BERT-like, masked-LM pretrained): ftl trains it for classification only
        "encoder": cfg.model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES,
        "base_prefix": names.get(id(_decoder(model)), "") if hasattr(model, "base_model_prefix") else "",
        "params": params,
        "tied": tied,
        "linears": linears,
        "buffers_bytes": buffers,
        "layers": {"path": layers[0], "count": len(layers[1])} if layers else None,
        "input_embedding": names.get(id(emb)) if emb is not None else None,
        "output_embedding": names.get(id(out)) if out is not None else None,
        "experts": _first(cfg, EXPERT_KEYS),
        "experts_per_token": _first(cfg, TOP_K_KEYS),
        "numel": sum(p.numel() for p in model.parameters()),
    }


# ---------------------------------------------------------------------------------------------
# The probe attention: CUDA SDPA's saved set, the FLOP counter's count


class _Calls:
    """Attention FLOPs of the running forward, as the FLOP counter counts the CUDA kernels."""

    forward_flops = 0


class _FlashLike(torch.autograd.Function):
    """Saves q, k, v (GQA unexpanded), the output and an fp32 log-sum-exp, as flash / efficient SDPA do."""

    @staticmethod
    def forward(ctx, q, k, v):  # type: ignore[override]
        b, h, s, _ = q.shape
        out = q.new_empty(b, h, s, v.shape[-1])
        lse = torch.empty(b, h, s, dtype=torch.float32, device=q.device)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        q, k, v, _, _ = ctx.saved_tensors
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _probe_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    b, h, s, dq = query.shape
    skv, dv = key.shape[-2], value.shape[-1]
    # flop_counter's sdpa_flop_count: 2*b*h*s*skv*(dq + dv) forward (the full square, as the kernels do
    # it); the backward recomputes the scores: 2.5 times the forward
    fwd = 2 * b * h * s * skv * (dq + dv)
    _Calls.forward_flops += fwd
    if torch.is_autocast_enabled("cpu"):
        # CUDA autocast runs SDPA in the lower precision: fp32 q / k (rotary in an fp32 residual
        # stream) are cast, and the kernel saves the casts
        dt = torch.get_autocast_dtype("cpu")
        query, key, value = (t.to(dt) for t in (query, key, value))
    out = _FlashLike.apply(query, key, value)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(PROBE_ATTENTION, _probe_attention)
def _no_mask(*args, **kwargs):
    """The probe kernel takes no mask (it computes nothing): building one would only cost time."""
    return None


AttentionMaskInterface.register(PROBE_ATTENTION, _no_mask)


# ---------------------------------------------------------------------------------------------
# Measurement


_VIEWS = {"TBackward0", "ViewBackward0", "TransposeBackward0", "PermuteBackward0", "ExpandBackward0",
          "UnsafeViewBackward0", "AsStridedBackward0", "UnsqueezeBackward0", "SqueezeBackward0",
          "SqueezeBackward1", "AliasBackward0"}


def is_param_cast(t: torch.Tensor) -> bool:
    """A (view of an) autocast copy of a trainable parameter: kept once per weight, not per token."""
    node = t.grad_fn
    while node is not None and type(node).__name__ in _VIEWS:
        nxt = [n for n, _ in node.next_functions if n is not None]
        node = nxt[0] if nxt else None
    if node is None or type(node).__name__ != "ToCopyBackward0":
        return False
    nxt = [n for n, _ in node.next_functions if n is not None]
    return bool(nxt) and type(nxt[0]).__name__ == "AccumulateGrad"


def _build(cfg, head: str, dtype: torch.dtype, attn: str) -> nn.Module:
    cls = _model_class(head)
    last: Exception | None = None
    for impl in ((attn,) if attn == "eager" else (PROBE_ATTENTION, "sdpa", "eager")):
        try:
            return cls.from_config(cfg, dtype=dtype, attn_implementation=impl)
        except (ValueError, ImportError, NotImplementedError) as e:  # this model has no such implementation
            last = e
    raise last  # type: ignore[misc]


def _to_fake(model: nn.Module, mode: FakeTensorMode) -> None:
    """Every meta parameter and buffer of `model` replaced by a CPU fake tensor (tied ones stay tied)."""
    memo: dict[int, torch.Tensor] = {}

    def fake(t: torch.Tensor) -> torch.Tensor:
        return mode.fake_tensor_converter.from_meta_and_device(mode, t, torch.device("cpu"))

    for mod in model.modules():
        for name, p in list(mod._parameters.items()):
            if p is not None:
                if id(p) not in memo:
                    memo[id(p)] = nn.Parameter(fake(p.detach()), requires_grad=p.requires_grad)
                mod._parameters[name] = memo[id(p)]  # type: ignore[assignment]
        for name, buf in list(mod._buffers.items()):
            if buf is not None and buf.device.type == "meta":
                if id(buf) not in memo:
                    memo[id(buf)] = fake(buf)
                mod._buffers[name] = memo[id(buf)]


def _decoder(model: nn.Module) -> nn.Module:
    """The causal LM's body (everything but the output head)."""
    for name in ("model", model.base_model_prefix):
        body = getattr(model, name, None)
        if isinstance(body, nn.Module) and body is not model:
            return body
    return model.get_decoder()


def _apply_method(model: nn.Module, v: dict[str, Any]) -> nn.Module:
    method = v["method"]
    if method == "full":
        return model
    if method == "freeze":
        model.requires_grad_(False)
        for name in v["trainable"]:
            model.get_parameter(name).requires_grad_(True)
        return model
    from peft import LoraConfig  # only the LoRA variants need PEFT

    model.requires_grad_(False)
    lcfg = LoraConfig(r=v["lora_r"], lora_alpha=v["lora_alpha"], lora_dropout=v["lora_dropout"],
                      target_modules=v["lora_targets"] or None, modules_to_save=v["modules_to_save"] or None,
                      bias="none")
    adapter_fp32 = v["precision"] != "bf16-pure"
    return lora_model(model, lcfg, adapter_fp32)


def _grouped_mm_flops(a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    """torch._grouped_mm (fused MoE experts), which FlopCounterMode does not count: 2 FLOPs per
    multiply-add. (T, K) x (E, K, N) -> (T, N): 2*T*K*N; the weight gradient (K, T) x (T, N) ->
    (E, K, N): 2*K*T*N; the contraction is a's last dimension either way."""
    rows = 1
    for d in out_shape[-2:]:
        rows *= d
    return 2 * rows * a_shape[-1]


def _native_dropout(input, p=0.5, training=True, inplace=False):  # noqa: A002 - F.dropout's signature
    """F.dropout as CUDA runs it: native_dropout keeps a bool mask (the CPU keeps a noise tensor of the
    input's dtype)."""
    if not training or p == 0:
        return input
    return torch.native_dropout(input, p, True)[0]


def _steps(request: dict[str, Any], inv: dict[str, Any], v: dict[str, Any], layers: int | None) -> list[dict[str, Any]]:
    """One fake training step of variant `v` per (batch, sequence) shape of SHAPES."""
    cfg = _config(request, layers)
    head = request.get("head", "causal_lm")
    precision = v["precision"]
    lora = v["method"] in ("lora", "qlora")
    cd = DTYPES[precision]
    if lora or precision in ("bf16-pure", "fp32"):
        base = cd
    else:
        base = torch.float32  # full / freeze: fp32 masters, autocast computes in 16 bit
    autocast = precision in ("bf16", "fp16")
    # built, adapted and cast on the meta device (PEFT moves and casts modules, which fake parameters do
    # not allow), then every parameter and buffer becomes a CPU fake tensor of the same shape and dtype
    with torch.device("meta"):
        model = _build(cfg, head, base, v.get("attn", "sdpa"))
        layers_path = inv["layers"]["path"] if inv["layers"] else None
        layer_mods = list(model.get_submodule(layers_path)) if layers_path else []
        if layers is not None:
            built = _signatures([(n, p.shape) for n, p in model.named_parameters()], layers_path, layers)
            if len(layer_mods) != layers or built != _signatures([(p["name"], p["shape"]) for p in inv["params"]],
                                                                 layers_path, layers):
                raise _NotCut(f"the first {layers} layers of the cut model differ from the full model's")
        for name, p in model.named_parameters():
            # fused experts run a grouped matmul that autocast does not cast and that has no fp32
            # kernel: they compute in the compute dtype, as the GPU kernels do
            if p.dim() >= 3 and ROUTED.search(name) and p.dtype != cd:
                p.data = p.data.to(cd)
        body = model if head == "seq_cls" else _decoder(model)
        model = _apply_method(model, v)
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    _to_fake(model, mode)
    n = len(layer_mods)
    st: dict[str, Any] = {}

    def counted() -> int:
        return st["flops"].get_total_flops() + _Calls.forward_flops

    def pre(i: int):
        def hook(mod, args):
            st["where"] = i
            st["fwd"][i] -= counted()
            st["attn"][i] -= _Calls.forward_flops
        return hook

    def post(i: int):
        def hook(mod, args, out):
            st["fwd"][i] += counted()
            st["attn"][i] += _Calls.forward_flops
            st["where"] = -1
            t = out[0] if isinstance(out, (tuple, list)) else getattr(out, "last_hidden_state", out)
            if isinstance(t, torch.Tensor) and t.requires_grad:
                marks = st["mark"]
                t.register_hook(lambda g: marks.append((i, st["flops"].get_total_flops())))
        return hook

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.layout != torch.strided:
            return t
        storage = t.untyped_storage()
        key = storage._cdata
        if key in param_keys or storage.nbytes() == 0:
            return t
        saved = st["saved"]
        if key not in saved:
            copy = is_param_cast(t) or (t.grad_fn is None and t.dtype in (torch.bfloat16, torch.float16)
                                        and (tuple(t.shape) in frozen32 or tuple(t.shape)[::-1] in frozen32))
            # the record holds the tensor until the step is counted: a storage freed on the way (a graph
            # dropped) would otherwise leave its address to a later one, which dedup would then skip
            saved[key] = (st["where"], "weight_copy" if copy else "activation", storage.nbytes(), t)
        return t

    runs = []
    dropout = torch.nn.functional.dropout
    torch.nn.functional.dropout = _native_dropout  # type: ignore[assignment]
    try:
        with mode:
            model.train()
            if v.get("input_rg"):
                model.enable_input_require_grads()
            param_keys = {p.untyped_storage()._cdata for p in model.parameters()}
            frozen32 = {tuple(p.shape) for p in model.parameters() if not p.requires_grad and p.dtype == torch.float32}
            handles = []
            for i, m in enumerate(layer_mods):
                handles.append(m.register_forward_pre_hook(pre(i)))
                handles.append(m.register_forward_hook(post(i)))
            vocab = max(2, int(inv["vocab"]))
            for shape_index, (b, s) in enumerate(request.get("shapes") or SHAPES):
                backward = shape_index < 2  # FLOPs are linear in the batch: the batch-2 runs need no backward
                runs.append(_step(model, body, head, vocab, b, s, backward, autocast, cd, n, st, counted, pack))
            for h in handles:
                h.remove()
    finally:
        torch.nn.functional.dropout = dropout  # type: ignore[assignment]
    return runs


def _step(model, body, head, vocab, b, s, backward, autocast, cd, n, st, counted, pack) -> dict[str, Any]:
    counter = FlopCounterMode(display=False, custom_mapping={torch.ops.aten._grouped_mm: _grouped_mm_flops})
    st.update(where=-1, saved={}, flops=counter, fwd=[0] * n, bwd=[0] * n, attn=[0] * n, mark=[])
    flops = st["flops"]
    ids = torch.randint(0, vocab, (b, s))
    _Calls.forward_flops = 0
    with ExitStack() as stack:
        if autocast:
            stack.enter_context(torch.autocast("cpu", dtype=cd))
        stack.enter_context(flops)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            if head == "seq_cls":
                out = model(input_ids=ids, labels=torch.zeros(b, dtype=torch.long)).loss
            else:
                out = body(input_ids=ids, use_cache=False).last_hidden_state
        fwd = counted()
        out_nb = out.element_size()
        bwd = 0
        fwd_f, bwd_f, attn_f = st["fwd"], st["bwd"], st["attn"]
        if out.requires_grad and backward:
            start = flops.get_total_flops()
            out.backward(torch.empty_like(out) if out.dim() else None)
            end = flops.get_total_flops()
            bwd = end - start
            # layer i's backward runs from its output's gradient to its input's (layer i - 1's
            # output); the first layer's ends with the backward (embeddings count no matmul)
            ready = {i: c for i, c in st["mark"]}
            for i in range(n):
                if i in ready:
                    bwd_f[i] = ready.get(i - 1, end) - ready[i] + int(2.5 * attn_f[i])
            bwd += int(2.5 * sum(attn_f))
    layers, copies = [0] * n, [0] * n
    outside = outside_copies = 0
    for idx, kind, nbytes, _ in st["saved"].values():
        if idx >= 0:
            (copies if kind == "weight_copy" else layers)[idx] += nbytes
        elif kind == "weight_copy":
            outside_copies += nbytes
        else:
            outside += nbytes
    return {
        "b": b, "s": s, "out_nb": out_nb,
        # per layer
        "saved": layers, "weight_copies": copies, "forward_flops": fwd_f, "backward_flops": bwd_f,
        "attention_flops": [int(3.5 * f) for f in attn_f],
        # outside the layers (embeddings, final norm; the classification head and loss for seq_cls)
        "outside": {"saved": outside, "weight_copies": outside_copies,
                    "forward_flops": int(fwd - sum(fwd_f)), "backward_flops": int(bwd - sum(bwd_f))},
    }


class _NotCut(Exception):
    """The config's layer count could not be cut: measure at full depth."""


def _signatures(params, path: str, n: int) -> list[frozenset]:
    """Per layer, its parameters' (name inside the layer, shape)."""
    sigs: list[set] = [set() for _ in range(n)]
    for name, shape in params:
        if name.startswith(path + "."):
            idx, rest = name[len(path) + 1:].split(".", 1)
            if int(idx) < n:
                sigs[int(idx)].add((rest, tuple(shape)))
    return [frozenset(s) for s in sigs]


def _pattern(inv: dict[str, Any]) -> tuple[int, int] | None:
    """(P, p): after a distinct first P layers, the layers repeat with period p (p = 1: all alike; a
    dense first few then MoE; attention every 8th layer). None when nothing repeats often enough."""
    if not inv["layers"]:
        return None
    n = inv["layers"]["count"]
    sigs = _signatures([(p["name"], p["shape"]) for p in inv["params"]], inv["layers"]["path"], n)
    best = None
    for period in range(1, n // 3 + 1):
        for prefix in range(0, n - 3 * period):
            if all(sigs[i] == sigs[prefix + (i - prefix) % period] for i in range(prefix, n)):
                if best is None or prefix + period < best[0] + best[1]:
                    best = (prefix, period)
                break
    return best


def _extend(run: dict[str, Any], n: int, prefix: int, period: int) -> dict[str, Any]:
    """A run of the n-layer model from one cut to k = P + p + 1 layers. What a layer saves and computes
    depends on its own kind and on whether its input needs a gradient (not in the first layer), so a
    layer i >= k does what the cut model's layer of its kind past the first did."""
    k = len(run["saved"])
    src = [i if i < k else (prefix + period if (i - prefix) % period == 0 else prefix + (i - prefix) % period)
           for i in range(n)]
    out = dict(run)
    for key in ("saved", "weight_copies", "forward_flops", "backward_flops", "attention_flops"):
        out[key] = [run[key][j] for j in src]
    out["depth"] = f"cut to {k} layers (first {prefix} distinct, then a period of {period})"
    return out


def measure(request: dict[str, Any], inv: dict[str, Any], variant: dict[str, Any]) -> dict[str, Any]:
    """Runs at SHAPES. A model whose layers repeat (`_pattern`; not frozen by layer) is measured cut to
    a few layers and extended (`_extend`); otherwise at full depth."""
    n = inv["layers"]["count"] if inv["layers"] else 0
    pattern = _pattern(inv) if variant["method"] != "freeze" else None
    prefix, period = pattern or (0, 1)
    k = prefix + period + 1
    if pattern is not None and n > k + period:
        try:
            return {"runs": [_extend(r, n, prefix, period) for r in _steps(request, inv, variant, k)]}
        except _NotCut:
            pass
    return {"runs": _steps(request, inv, variant, None)}


def answer(request: dict[str, Any]) -> dict[str, Any]:
    """Inventory (always) and the measurements of `request["variants"]` ({key: variant}) and of the
    variants of `request["recipes"]` (recipe dicts; their variants worked out here from the inventory,
    as launcher.estimate.probed does, so one process answers a first estimate)."""
    warnings.filterwarnings("ignore")
    transformers.logging.set_verbosity_error()
    head = request.get("head", "causal_lm")
    try:
        cfg = _config(request)
        with torch.device("meta"):
            model = _model_class(head).from_config(cfg)
        inv = inventory_of(model, cfg)
    except Exception as e:  # a config transformers cannot build: the estimator says so, with this reason
        return {"error": "build", "reason": f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"}
    emb = next((p for p in inv["params"] if p["module"] == inv["input_embedding"]), None)
    inv["vocab"] = emb["shape"][0] if emb else 0
    out: dict[str, Any] = {"transformers": transformers.__version__, "torch": torch.__version__,
                           "inventory": inv, "measurements": {}, "failed": {}}
    variants = dict(request.get("variants") or {})
    if request.get("recipes"):
        arch = arch_from_inventory(out, request["config"], head, int(request.get("num_labels", 2)))
        for rd in request["recipes"]:
            try:
                recipe = Recipe.model_validate(rd)
                key, v = variant(arch, plan_params(arch, recipe), recipe)
            except Exception:  # noqa: BLE001 - a recipe the estimator will refuse needs no measurement
                continue
            variants.setdefault(key, v)
    for key, v in variants.items():
        try:
            out["measurements"][key] = measure(request, inv, v)
        except Exception as e:
            out["failed"][key] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
    return out


def main() -> int:
    json.dump(answer(json.load(sys.stdin)), sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
