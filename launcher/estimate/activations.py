"""Activation memory: what autograd holds for backward, derived op by op from what transformers runs.

Korthikanti et al. (2022) count ~34·s·b·h + 5·a·s²·b bytes per layer for a GPT layer in 16-bit;
that is the starting point, not the model. Real fine-tuning differs in ways that move the figure
by 2x either way: autocast keeps the residual stream in fp32 for fp32 master weights and makes a
separate 16-bit copy of a linear's input for *each* linear that reads it; RMSNorm upcasts to fp32;
a frozen linear saves nothing of its input; PEFT LoRA casts its input to the adapter's fp32, applies
dropout and lets autocast cast it back, so every adapted linear keeps its own copy; SDPA's flash and
memory-efficient kernels keep q, k, v, the output and a log-sum-exp but no s² scores; GELU-tanh as
GPT-2 writes it keeps four intermediates; the loss upcasts the logits to fp32.

So instead of a closed formula this module runs a *symbolic forward*: `_Trace` walks the layers
with tensors described only by their size per token, element size and whether they require grad,
applying PyTorch's save rules (derivatives.yaml) and autocast's cast policy, and records each
saved tensor once under its storage identity (views and aliases share one). The result is exact
for the code paths it mirrors (transformers 5.x modeling code, PEFT 0.1x/0.2x LoRA, bitsandbytes
0.4x/0.5x, PyTorch 2.x); tests/test_activations.py compares it with the storages saved-tensor
hooks see on CPU. See docs/estimation-activations.md for the derivation and its limits.

No torch here: `ftl estimate` must answer without importing it.

Conventions (what ftl's trainer does):
* full / freeze: parameters in fp32, forward under autocast(bf16|fp16); fp32 precision: no autocast.
* bf16-pure: every parameter (adapters included) in bf16 and no autocast: the residual stream, the
  LoRA round trip and the saved inputs are bf16; norms and softmax still upcast internally.
* lora / qlora: frozen base in the compute dtype (bf16/fp16; qlora: 4-bit linears computing in it),
  adapters in fp32 (PEFT's autocast_adapter_dtype), forward under autocast.
* gradient checkpointing: non-reentrant, one checkpoint per decoder layer (transformers'
  GradientCheckpointingLayer), no offload; enabling it makes the embedding output require grad
  (transformers calls enable_input_require_grads() for input_ids models).
* full-length sequences, no padding mask: SDPA runs with is_causal and native GQA (transformers
  passes enable_gqa when there is no mask). With `data.packing` the estimate assumes a 4-D mask
  (packed-sequence mask): k/v are expanded to all heads and each layer holds a float copy of it.
* loss: SFT and DPO train through TRL, whose trainers (1.16) always score tokens with TRL's fused
  LM head (`add_fused_lm_head`, trl/kernels/chunked_logprob.py): log-probabilities in tiles of
  4096 tokens × 32768 vocabulary entries, recomputed in the backward, never the full logits;
  `train.cross_entropy: chunked` puts DAPT on it too. Otherwise (DAPT) transformers'
  ForCausalLMLoss: logits.float() then cross_entropy.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Literal

from types import SimpleNamespace

from launcher.estimate import probed
from launcher.estimate.arch import dropout_from_config  # noqa: F401  (re-exported)
from launcher.estimate.arch import Arch, Linear
from launcher.estimate.params import ParamPlan, modules_to_save
from launcher.spec.recipe import Recipe

Device = Literal["cuda", "cpu"]

FP32 = 4
INT64 = 8
BOOL = 1
MIN_OFFLOAD_BYTES = 1024  # TRL's min_offload_size (launcher/train/offload.py): smaller saves stay put

# TRL 1.16's fused LM head (trl/kernels/chunked_logprob.py, trl/trainer/utils.py add_fused_lm_head)
TRL_TOKEN_CHUNK = 4096  # TOKEN_CHUNK_SIZE: rows of one tile
TRL_VOCAB_CHUNK = 32768  # _CHUNKED_LOGPROB_CHUNK_SIZE: the tile buffer's width, whatever the vocabulary
TRL_ACCUMULATORS = 7  # fp32 per-token running statistics of the forward (max, sums, target logit...)
# Per-token tensors the head keeps for backward besides its input copy: int64 targets, fp32 log_z and
# entropy, and (CUDA, compact rows) the int64 row/column indices of the masked selection and the bool
# mask of masked_scatter; (CPU, every row) one bool ~mask per differentiable output's masked_fill.
TRL_SAVED_PER_TOKEN = {"cuda": INT64 + 4 + 4 + 2 * INT64 + BOOL, "cpu": INT64 + 4 + 4 + 2 * BOOL}
# Without Triton (the CPU) TRL runs the tile in torch ops; fp32 tile-sized temporaries alive at once,
# counted on its torch fallback (_forward_tile / _backward_tile) with tests/live_bytes.py. On CUDA the
# Triton kernels work in the tile buffer itself.
CPU_TILE_FP32 = {"forward": 3, "backward": 7}
CPU_TILE_BOOL = {"forward": 1, "backward": 1}


def loss_in_tiles(recipe: Recipe) -> bool:
    """True when the causal-LM loss runs through TRL's fused LM head rather than full logits."""
    return recipe.task in ("sft", "dpo") or recipe.train.cross_entropy == "chunked"


# Dropout probabilities transformers' configs default to, per family (the Arch inventory does not
# carry them; an Arch attribute `dropout` with the same keys overrides these).
_DEFAULT_DROPOUT: dict[str, dict[str, float]] = {
    "gpt2": {"embd": 0.1, "resid": 0.1, "attn": 0.1},
    "bert": {"embd": 0.1, "resid": 0.1, "attn": 0.1, "classifier": 0.1},
    "distilbert": {"embd": 0.1, "resid": 0.1, "attn": 0.1, "classifier": 0.2},
}


@dataclass(frozen=True)
class ActivationBytes:
    """Activation memory of one micro-batch on one device (bytes).

    saved: held by autograd for backward at the end of the forward: every layer's saved tensors (or,
        under gradient checkpointing, each layer's input), embeddings, final norm and head input.
        Excludes the loss buffers (in `logits`) and the autocast weight copies (in
        `detail["autocast weight copies"]`: they scale with parameters, not tokens).
    logits: the loss buffers at their peak, during the backward of the cross-entropy: the saved
        fp32 log-softmax output, the fp32 gradient nll_loss writes and log_softmax's fp32 input
        gradient, 12 bytes per logit (b·s·V). The forward holds at most 10 (16-bit logits, their
        fp32 copy and the log-softmax); at the end of the forward 4 remain (the log-softmax output,
        `detail["loss saved (log-softmax)"]`), which saved-tensor hooks count as saved.
    backward_transient: what the backward of the worst layer adds beyond `saved`: the gradient of
        the layer's output and of its widest intermediates alive together, and under checkpointing
        the recomputed layer's saved set (`per_layer`) on top.
    per_layer: saved bytes of one transformer layer whose input requires grad (no checkpointing).
    detail: named components of `saved` for the breakdown table, plus informational entries
        (marked in `INFO_KEYS`) that are *not* part of `saved`.
    """

    saved: int
    logits: int
    backward_transient: int
    per_layer: int
    detail: dict[str, int] = field(default_factory=dict)
    offloaded: int = 0  # train.activation_offloading: bytes held in host RAM per micro-batch (see `offloaded_bytes`)


# detail entries that are not components of `saved`
INFO_KEYS = (
    "autocast weight copies",
    "autocast weight copies (forward)",
    "loss saved (log-softmax)",
    "recomputed layer",
    "logits (forward peak)",
    "offloaded saved",
    "offloaded weight copies",
    "offloaded loss saved",
    "restored layer",
    "offload leaf kept",
)


# ---------------------------------------------------------------------------------------------
# The symbolic forward


@dataclass(frozen=True)
class _T:
    """A tensor: `feat` elements per token (per sample and position), `nb` bytes per element."""

    key: int
    feat: float
    nb: int
    rg: bool  # requires grad


class _Trace:
    """Applies PyTorch's save rules to symbolic tensors; records each saved storage once."""

    def __init__(self, *, autocast: bool, cd: int, device: Device) -> None:
        self.autocast = autocast
        self.cd = cd  # compute (autocast) element size
        self.device = device
        self._ids = itertools.count(1)
        self.saved: dict[int, tuple[str, float]] = {}  # storage key -> (component, bytes per token)
        self.component = "other"
        self.weight_copy_params = 0  # parameters whose autocast 16-bit copy autograd keeps
        self.size: dict[int, float] = {}  # storage key -> bytes per token of the whole storage
        self.rope_nb = FP32  # element size of the rotary cos/sin tables
        self.repeated: set[int] = set()  # storages saved by more than one op
        self.head_keys: set[int] = set()  # storages the output head itself saves (its forward)

    # -- tensors
    def new(self, feat: float, nb: int, rg: bool) -> _T:
        t = _T(next(self._ids), feat, nb, rg)
        self.size[t.key] = feat * nb
        return t

    @staticmethod
    def view(t: _T, feat: float) -> _T:
        """A view (slice, chunk, reshape) of `t`: shares its storage, so saving it keeps all of it."""
        return _T(t.key, feat, t.nb, t.rg)

    def save(self, t: _T, component: str | None = None) -> None:
        if t.key in self.saved:
            self.repeated.add(t.key)
        else:
            self.saved[t.key] = (component or self.component, self.size.get(t.key, t.feat * t.nb))

    def cast(self, t: _T, nb: int) -> _T:
        """`t.to(dtype)`: the same tensor when the dtype matches, else a new one (saves nothing)."""
        return t if t.nb == nb else self.new(t.feat, nb, t.rg)

    def autocast_in(self, t: _T) -> _T:
        """Input of an op on autocast's lower-precision list (linear, matmul, SDPA): cast per call."""
        return self.cast(t, self.cd) if self.autocast else t

    def fp32_op_in(self, t: _T) -> _T:
        """Input of an op on autocast's fp32 list (CUDA: pow, layer_norm, softmax, ...)."""
        if self.autocast and self.device == "cuda":
            return self.cast(t, FP32)
        return t

    def bytes_per_token(self) -> float:
        return sum(v for _, v in self.saved.values())

    def by_component(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for comp, v in self.saved.values():
            out[comp] = out.get(comp, 0.0) + v
        return out

    def mask_nb(self, t: _T) -> int:
        """Element size of what dropout saves: CUDA's fused native_dropout keeps a bool mask; the
        CPU path multiplies by a noise tensor of the input's dtype and keeps that."""
        return BOOL if self.device == "cuda" else t.nb

    # -- ops
    def dropout(self, x: _T, p: float) -> _T:
        if p <= 0:
            return x  # F.dropout(p=0) and nn.Identity return the input itself
        if x.rg:
            self.save(self.new(x.feat, self.mask_nb(x), False), "dropout masks")
        return self.new(x.feat, x.nb, x.rg)

    def mul(self, a: _T, b: _T, out_nb: int | None = None) -> _T:
        """a * b: saves b for a's grad and a for b's grad."""
        if a.rg:
            self.save(b)
        if b.rg:
            self.save(a)
        return self.new(max(a.feat, b.feat), out_nb or max(a.nb, b.nb), a.rg or b.rg)

    def add(self, a: _T, b: _T) -> _T:
        return self.new(max(a.feat, b.feat), max(a.nb, b.nb), a.rg or b.rg)


@dataclass
class _Ctx:
    arch: Arch
    recipe: Recipe
    params: ParamPlan
    tr: _Trace
    s: int
    cd: int
    base_nb: int  # element size of base-model parameters (frozen or trained)
    lora_targets: set[tuple[str, str]]  # (block name, linear name)
    quantized: set[tuple[str, str]]  # bitsandbytes 4-bit linears
    lora_r: int
    lora_p: float
    adapter_nb: int  # element size of the LoRA adapters: fp32, bf16 under bf16-pure
    dropout: dict[str, float]
    masked: bool
    layer_trains: list[bool]  # per layer: its own weights train (full / freeze)


def _linear(c: _Ctx, x: _T, block: str, lin: Linear, trains: bool) -> _T:
    """nn.Linear / Conv1D (or bitsandbytes Linear4bit) with an optional PEFT LoRA adapter.

    Base: mm saves its input when the weight trains (for dW) and the weight when the input needs a
    gradient (dX). Under autocast the input is cast to 16 bit per call, so each trained linear keeps
    its own copy unless the input already is 16-bit; the cast of an fp32 trainable weight is cached
    and kept for dX ("autocast weight copies"). A frozen linear keeps nothing per token; neither does
    bitsandbytes' MatMul4Bit (0.45+ keeps only the packed weight and dequantizes it in backward).
    LoRA (PEFT): x is cast to the adapter dtype (fp32), dropout keeps a mask (if x needs grad),
    lora_A keeps its (autocast-16-bit) input, lora_B keeps lora_A's output (r features).
    """
    tr = c.tr
    out_nb = tr.cd if tr.autocast else x.nb
    if (block, lin.name) in c.quantized:
        out_nb = x.nb  # Linear4bit casts x to its compute dtype and the result back to x's dtype
    elif trains:
        tr.save(tr.autocast_in(x), tr.component)
        if x.rg and tr.autocast and c.base_nb != tr.cd:
            tr.weight_copy_params += lin.weight_params
    is_lora = (block, lin.name) in c.lora_targets
    if is_lora:
        x32 = tr.cast(x, c.adapter_nb)
        xd = tr.dropout(x32, c.lora_p)
        tr.save(tr.autocast_in(xd), "lora inputs")
        tr.save(tr.new(c.lora_r, tr.cd if tr.autocast else c.adapter_nb, True), "lora inputs")
        if tr.autocast:  # cached 16-bit copies of A (kept if x needs grad) and B (always)
            tr.weight_copy_params += c.lora_r * (lin.in_features * x.rg + lin.out_features)
    return tr.new(lin.out_features, out_nb, x.rg or trains or is_lora)


def _rmsnorm(c: _Ctx, x: _T, trains: bool, gemma: bool = False) -> _T:
    """Llama RMSNorm: x32 = x.float(); x32 * rsqrt(mean(x32²)+eps); weight * that.to(x.dtype).

    Saves x32 (a new fp32 copy unless the residual stream is fp32 already) and rsqrt (1 value per
    token) when x needs grad; the normalised tensor when the weight trains. Gemma multiplies in
    fp32 by (1 + weight) before casting back, so its normalised tensor is always fp32.
    """
    tr = c.tr
    x32 = tr.cast(x, FP32)
    if x.rg:
        tr.save(x32, "norms")
        tr.save(tr.new(1, FP32, True), "norms")
    normed = tr.new(x.feat, FP32, x.rg)
    if gemma:
        if trains:
            tr.save(normed, "norms")
        return tr.new(x.feat, x.nb, x.rg or trains)
    normed = tr.cast(normed, x.nb)
    if trains:
        tr.save(normed, "norms")
    out_nb = max(c.base_nb, x.nb)
    return tr.new(x.feat, out_nb, x.rg or trains)


def _layernorm(c: _Ctx, x: _T, trains: bool) -> _T:
    """nn.LayerNorm: native_layer_norm saves input, mean and rstd when anything needs grad.

    On CUDA autocast puts layer_norm on its fp32 list (the input is cast to fp32, the output is
    fp32); CPU autocast leaves it in the input's dtype.
    """
    tr = c.tr
    xin = tr.fp32_op_in(x)
    if x.rg or trains:
        tr.save(xin, "norms")
        # mean and rstd: fp32 on CUDA (accumulate type), the input's dtype on CPU
        tr.save(tr.new(2, FP32 if tr.device == "cuda" else xin.nb, True), "norms")
    return tr.new(x.feat, xin.nb, x.rg or trains)


def _silu_mul(c: _Ctx, gate: _T, up: _T) -> _T:
    """act(gate) * up (SwiGLU / GeGLU): silu/gelu saves its input, the product saves both factors."""
    tr = c.tr
    if gate.rg:
        tr.save(gate, "mlp")
    act = tr.new(gate.feat, gate.nb, gate.rg)
    return tr.mul(act, up)


def _gelu_new(c: _Ctx, x: _T) -> _T:
    """GPT-2's gelu_new, written out in Python: 0.5*x * (1 + tanh(√(2/π)·(x + 0.044715·x³))).

    Saves pow's input (an fp32 copy on CUDA, where pow is on autocast's fp32 list), tanh's output,
    (1 + tanh) and 0.5·x; the result is fp32 on CUDA under autocast (promotion).
    """
    tr = c.tr
    if not x.rg:
        return x
    xp = tr.fp32_op_in(x)
    tr.save(xp)  # pow(x, 3) keeps x
    u_nb = xp.nb
    th = tr.new(x.feat, u_nb, True)
    tr.save(th)  # tanh keeps its output
    w = tr.new(x.feat, u_nb, True)  # 1 + tanh
    half = tr.new(x.feat, x.nb, True)  # 0.5 * x
    return tr.mul(half, w)


def _gelu(c: _Ctx, x: _T) -> _T:
    """F.gelu (exact or tanh-approximate, one kernel) saves its input."""
    if x.rg:
        c.tr.save(x)
    return c.tr.new(x.feat, x.nb, x.rg)


def _sdpa_expands_kv(c: _Ctx) -> bool:
    """transformers 5 passes enable_gqa to SDPA only without a mask and with head_dim <= 256;
    otherwise repeat_kv materialises k and v at all heads first."""
    return c.arch.kv_heads < c.arch.heads and (c.masked or c.arch.head_dim > 256)


def _sdpa_kernel(c: _Ctx) -> str:
    """Which SDPA backend runs: 'flash' (flash, memory-efficient or CPU flash: O(s) memory) or 'math'."""
    tr = c.tr
    if tr.device == "cpu" and c.dropout.get("attn", 0.0) > 0:
        return "math"  # the CPU flash kernel has no dropout
    gqa_native = c.arch.kv_heads < c.arch.heads and not _sdpa_expands_kv(c)
    if tr.device == "cuda" and tr.cd == FP32 and gqa_native:
        return "math"  # enable_gqa is taken by flash only (16-bit); fp32 falls back to math
    return "flash"


def _attention(c: _Ctx, q: _T, k: _T, v: _T) -> _T:
    """The attention core between the projections. Returns the (b, s, heads·hd) output.

    sdpa, flash/memory-efficient kernels (and flash_attention_2): keep q, k, v (k/v at kv heads,
    transformers passes enable_gqa), the output and an fp32 log-sum-exp per head and token; the
    output is laid out (b, s, h, d), so transpose+contiguous before o_proj is free. With a mask
    (packing) k/v are expanded to all heads (repeat_kv) and the boolean mask is converted to an
    additive float mask per call, kept by the kernel: s values per token and layer.
    eager / SDPA math: q·kᵀ keeps q and k (k/v expanded to all heads), softmax keeps its output
    (fp32), its 16-bit cast (and dropout mask + dropped probabilities) are kept by probs·v with v;
    the output is copied by transpose().contiguous(): heads·s extra values per token per tensor.
    """
    tr, a = c.tr, c.arch
    heads, hd = a.heads, a.head_dim
    s = c.s
    impl = c.recipe.train.attn_implementation
    rg = q.rg or k.rg or v.rg
    tr.component = "attention"
    if impl == "flash_attention_2" or (impl == "sdpa" and _sdpa_kernel(c) == "flash"):
        q, k, v = tr.autocast_in(q), tr.autocast_in(k), tr.autocast_in(v)
        if impl == "sdpa" and _sdpa_expands_kv(c):
            k = tr.new(heads * hd, k.nb, k.rg)
            v = tr.new(heads * hd, v.nb, v.rg)
        out = tr.new(heads * hd, q.nb, rg)
        if rg:
            for t in (q, k, v, out):
                tr.save(t)
            tr.save(tr.new(heads, FP32, False))  # log-sum-exp
            if impl == "sdpa" and c.masked:
                tr.save(tr.new(s, q.nb, False))  # float copy of the (b, 1, s, s) mask
        return out
    if impl == "sdpa":  # SDPA's math fallback (_scaled_dot_product_attention_math)
        # autocast casts q, k, v to 16 bit; on CPU the math path upcasts 16-bit inputs to fp32.
        nb = FP32 if tr.device == "cpu" else tr.autocast_in(q).nb
        qm = tr.new(heads * hd, nb, q.rg)  # q * sqrt(scale)
        km = tr.new(heads * hd, nb, k.rg)  # (repeat_interleave'd) k * sqrt(scale)
        vm = tr.new(heads * hd, nb, v.rg) if (a.kv_heads < heads or v.nb != nb) else v
        if rg:
            tr.save(qm)
            tr.save(km)
        probs = tr.new(heads * s, nb, rg)  # _safe_softmax keeps its output
        if rg:
            tr.save(probs)
        probs = tr.dropout(probs, c.dropout.get("attn", 0.0))
        if rg:
            tr.save(probs)
            tr.save(vm)
        out = tr.cast(tr.new(heads * hd, nb, rg), tr.autocast_in(q).nb)
        return tr.new(heads * hd, out.nb, rg)  # (b, h, s, d) -> transpose(1, 2).contiguous() copies
    # eager (transformers' eager_attention_forward of the family)
    if a.kv_heads < heads:
        k = tr.new(heads * hd, k.nb, k.rg)  # repeat_kv materialises k and v at all heads
        v = tr.new(heads * hd, v.nb, v.rg)
    qm, km = tr.autocast_in(q), tr.autocast_in(k)
    if rg:
        tr.save(qm)
        tr.save(km)
    scores = tr.new(heads * s, qm.nb, rg)
    if a.model_type in ("gpt2", "bert", "distilbert"):
        probs = tr.new(heads * s, tr.fp32_op_in(scores).nb, rg)  # softmax: on CUDA's fp32 list
    else:
        probs = tr.new(heads * s, FP32, rg)  # softmax(..., dtype=torch.float32)
    if rg:
        tr.save(probs)
    if a.model_type == "gpt2":
        probs = tr.cast(probs, v.nb)  # attn_weights.type(value.dtype)
    elif a.model_type not in ("bert", "distilbert"):
        probs = tr.cast(probs, q.nb)  # .to(query.dtype)
    probs = tr.dropout(probs, c.dropout.get("attn", 0.0))
    pm, vm = tr.autocast_in(probs), tr.autocast_in(v)
    if rg:
        tr.save(pm)
        tr.save(vm)
    out = tr.new(heads * hd, pm.nb, rg)
    return tr.new(heads * hd, out.nb, rg)  # transpose(1, 2).contiguous() copies


def _rotary(c: _Ctx, t: _T) -> _T:
    """q·cos + rotate_half(q)·sin: keeps only cos/sin (shared by all layers, counted once per
    model); the result is promoted to the tables' dtype (fp32 for fp32 master weights)."""
    return c.tr.new(t.feat, max(t.nb, c.tr.rope_nb), t.rg)


# ---------------------------------------------------------------------------------------------
# Layers per family


def _llama_layer(c: _Ctx, x: _T, i: int) -> _T:
    """Pre-norm decoder layer (Llama, Mistral, Qwen2/3, Gemma, Phi-3, OLMo-2, Mixtral):
    x + o(attn(rope(q(n(x))), rope(k(n(x))), v(n(x)))), then x + down(act(gate(n(x))) * up(n(x)))."""
    a, tr = c.arch, c.tr
    lin = {l.name: l for l in a.layer.linears}
    trains = c.layer_trains[i]
    gemma = a.model_type in ("gemma", "gemma2")
    q_dim, kv_dim = a.heads * a.head_dim, a.kv_heads * a.head_dim
    tr.component = "norms"
    h = _rmsnorm(c, x, trains, gemma)
    tr.component = "attention"
    if "self_attn.qkv_proj" in lin:  # phi3: q, k, v are slices of one projection
        qkv = _linear(c, h, "layer", lin["self_attn.qkv_proj"], trains)
        q, k, v = tr.view(qkv, q_dim), tr.view(qkv, kv_dim), tr.view(qkv, kv_dim)
    else:
        q = _linear(c, h, "layer", lin["self_attn.q_proj"], trains)
        k = _linear(c, h, "layer", lin["self_attn.k_proj"], trains)
        v = _linear(c, h, "layer", lin["self_attn.v_proj"], trains)
    if "qk_norms" in a.layer.other:  # qwen3 / olmo2: RMSNorm on q and k
        tr.component = "norms"
        q = _rmsnorm(c, q, trains)
        k = _rmsnorm(c, k, trains)
    q, k = _rotary(c, q), _rotary(c, k)
    o = _attention(c, q, k, v)
    tr.component = "attention"
    o = _linear(c, o, "layer", lin["self_attn.o_proj"], trains)
    if a.model_type == "gemma2":
        tr.component = "norms"
        o = _rmsnorm(c, o, trains, gemma)
    x = tr.add(x, o)
    tr.component = "norms"
    h = _rmsnorm(c, x, trains, gemma)
    tr.component = "mlp"
    if a.num_experts:
        out = _moe(c, h, trains)
    else:
        if "mlp.gate_up_proj" in lin:  # phi3: gate and up are halves of one output
            gu = _linear(c, h, "layer", lin["mlp.gate_up_proj"], trains)
            gate, up = tr.view(gu, a.intermediate), tr.view(gu, a.intermediate)
        else:
            gate = _linear(c, h, "layer", lin["mlp.gate_proj"], trains)
            up = _linear(c, h, "layer", lin["mlp.up_proj"], trains)
        tr.component = "mlp"
        m = _silu_mul(c, gate, up)
        out = _linear(c, m, "layer", lin["mlp.down_proj"], trains)
    if a.model_type == "gemma2":
        tr.component = "norms"
        out = _rmsnorm(c, out, trains, gemma)
    return tr.add(x, out)


def _moe(c: _Ctx, h: _T, trains: bool) -> _T:
    """Mixture of experts, approximated: router logits + softmax (fp32, E per token), then each token
    through k experts' SwiGLU (the dense MLP's saves times k, on the gathered rows)."""
    a, tr = c.arch, c.tr
    tr.component = "mlp"
    hin = tr.autocast_in(h)
    if trains or h.rg:
        tr.save(hin)
        tr.save(tr.new(a.num_experts, FP32, True))
    k = max(1, a.experts_per_token)
    inter = a.intermediate
    rg = h.rg or trains
    if rg:
        tr.save(tr.new(k * a.hidden, tr.cd if tr.autocast else h.nb, rg))  # gathered expert inputs
        nb = tr.cd if tr.autocast else h.nb
        for _ in range(4):  # gate, up, act, product per routed copy
            tr.save(tr.new(k * inter, nb, rg))
    return tr.new(a.hidden, tr.cd if tr.autocast else h.nb, rg)


def _gpt2_layer(c: _Ctx, x: _T, i: int) -> _T:
    """GPT-2 block: x + drop(c_proj(attn(split(c_attn(ln_1(x)))))), x + drop(c_proj(gelu_new(c_fc(ln_2(x)))))."""
    a, tr = c.arch, c.tr
    lin = {l.name: l for l in a.layer.linears}
    trains = c.layer_trains[i]
    tr.component = "norms"
    h = _layernorm(c, x, trains)
    tr.component = "attention"
    qkv = _linear(c, h, "layer", lin["attn.c_attn"], trains)
    hd = a.heads * a.head_dim
    # q, k, v are views of the one c_attn output: keeping any keeps the whole (b, s, 3h) storage
    o = _attention(c, tr.view(qkv, hd), tr.view(qkv, hd), tr.view(qkv, hd))
    tr.component = "attention"
    o = _linear(c, o, "layer", lin["attn.c_proj"], trains)
    o = tr.dropout(o, c.dropout.get("resid", 0.0))
    x = tr.add(x, o)
    tr.component = "norms"
    h = _layernorm(c, x, trains)
    tr.component = "mlp"
    f = _linear(c, h, "layer", lin["mlp.c_fc"], trains)
    tr.component = "mlp"
    g = _gelu_new(c, f)
    out = _linear(c, g, "layer", lin["mlp.c_proj"], trains)
    out = tr.dropout(out, c.dropout.get("resid", 0.0))
    return tr.add(x, out)


def _bert_layer(c: _Ctx, x: _T, i: int) -> _T:
    """Post-LN encoder layer (BERT, DistilBERT): LN(x + drop(attn(x))), LN(y + drop(ffn(y)))."""
    a, tr = c.arch, c.tr
    names = [l.name for l in a.layer.linears]
    lin = {l.name: l for l in a.layer.linears}
    trains = c.layer_trains[i]
    tr.component = "attention"
    q = _linear(c, x, "layer", lin[names[0]], trains)
    k = _linear(c, x, "layer", lin[names[1]], trains)
    v = _linear(c, x, "layer", lin[names[2]], trains)
    o = _attention(c, q, k, v)
    tr.component = "attention"
    o = _linear(c, o, "layer", lin[names[3]], trains)
    if a.model_type == "bert":
        o = tr.dropout(o, c.dropout.get("resid", 0.0))
    tr.component = "norms"
    y = _layernorm(c, tr.add(o, x), trains)
    tr.component = "mlp"
    f = _linear(c, y, "layer", lin[names[4]], trains)
    tr.component = "mlp"
    g = _gelu(c, f)
    out = _linear(c, g, "layer", lin[names[5]], trains)
    out = tr.dropout(out, c.dropout.get("resid", 0.0))
    tr.component = "norms"
    return _layernorm(c, tr.add(out, y), trains)


# ---------------------------------------------------------------------------------------------
# Whole model


def _dropouts(arch: Arch) -> dict[str, float]:
    """Dropout probabilities: Arch's `dropout` field when it has one (see `dropout_from_config`),
    else the defaults of the family's transformers config."""
    custom = getattr(arch, "dropout", None)
    if isinstance(custom, dict):
        return {k: float(v) for k, v in custom.items()}
    return dict(_DEFAULT_DROPOUT.get(arch.model_type, {}))


def _lora_target_keys(params: ParamPlan) -> set[tuple[str, str]]:
    return {(b.name, l.name) for b, l in params.lora_targets}


def _layer_trains(arch: Arch, recipe: Recipe) -> list[bool]:
    if recipe.method == "full":
        return [True] * arch.layers
    if recipe.method == "freeze":
        k = min(recipe.freeze.trainable_layers, arch.layers)
        return [i >= arch.layers - k for i in range(arch.layers)]
    return [False] * arch.layers


def _head_trains(arch: Arch, params: ParamPlan, recipe: Recipe) -> tuple[bool, bool]:
    """(final norm / pooler trains, output head trains)."""
    if recipe.method == "full":
        return True, True
    if recipe.method == "freeze":
        return True, recipe.freeze.train_head
    saved = modules_to_save(arch, recipe)
    head = arch.head_linear
    head_saved = head is not None and (head.short in saved or head.name in saved)
    return False, head_saved or any(b.name == "head" for b, _ in params.lora_targets)


def _run(arch: Arch, params: ParamPlan, recipe: Recipe, device: Device, checkpointing: bool, b: int, s: int):
    """The symbolic forward of one micro-batch: returns the trace (saved storages of everything
    outside checkpointed layers), the saved bytes per token of each layer, and the context."""
    precision = recipe.train.precision
    pure = precision == "bf16-pure"
    autocast = precision not in ("fp32", "bf16-pure")
    cd = FP32 if precision == "fp32" else 2
    method = recipe.method
    lora = method in ("lora", "qlora")
    # lora / qlora: base in the compute dtype (qlora: what stays unquantized -- embeddings, norms,
    # head -- is put back in it after prepare_model_for_kbit_training); full/freeze: fp32 masters;
    # bf16-pure: bf16 everywhere
    base_nb = cd if (lora or pure) else FP32
    tr = _Trace(autocast=autocast, cd=cd, device=device)
    c = _Ctx(
        arch=arch, recipe=recipe, params=params, tr=tr, s=s, cd=cd, base_nb=base_nb,
        lora_targets=_lora_target_keys(params) if lora else set(),
        quantized={(b_.name, l.name) for b_, l in params.quantized_linears},
        lora_r=recipe.lora.r, lora_p=recipe.lora.dropout, adapter_nb=2 if pure else FP32,
        dropout=_dropouts(arch), masked=recipe.data.packing and recipe.train.attn_implementation == "sdpa",
        layer_trains=_layer_trains(arch, recipe),
    )
    tr.rope_nb = base_nb  # cos/sin follow the embeddings' dtype
    emb_trains = params.embeddings_train
    layer_fn = _llama_layer if not arch.encoder and arch.model_type != "gpt2" else (_gpt2_layer if arch.model_type == "gpt2" else _bert_layer)

    # embeddings
    tr.component = "embeddings"
    if emb_trains:
        tr.save(tr.new(1, INT64, False))  # token ids kept by the embedding backward
        # position (and BERT token-type) ids: (1, s) int64, shared by the batch
        fixed_ids = {"gpt2": 1, "bert": 2, "distilbert": 1}.get(arch.model_type, 0)
        tr.save(tr.new(fixed_ids * INT64 / b, 1, False))
    # transformers' activation_checkpointing_enable calls enable_input_require_grads() for every
    # model fed input_ids (and PEFT does for LoRA): the embedding output then requires grad
    x_rg = emb_trains or checkpointing
    x = tr.new(arch.hidden, base_nb, x_rg)
    if arch.model_type == "gpt2":
        x = tr.dropout(tr.add(x, tr.new(arch.hidden, base_nb, emb_trains)), c.dropout.get("embd", 0.0))
    elif arch.encoder:
        x = _layernorm(c, tr.add(x, tr.new(arch.hidden, base_nb, emb_trains)), emb_trains)
        tr.component = "embeddings"
        x = tr.dropout(x, c.dropout.get("embd", 0.0))
    elif arch.model_type in ("gemma", "gemma2"):
        x = tr.new(arch.hidden, base_nb, x_rg)  # embeddings * sqrt(hidden)

    # layers: a layer's input needs grad if anything below it trains
    per_layer: list[float] = []
    layer_copies: list[int] = []
    ckpt_inputs = 0.0
    for i in range(arch.layers):
        before = tr.bytes_per_token()
        if checkpointing:
            # non-reentrant checkpoint keeps the layer's input; the layer's own saves are dropped
            ckpt_inputs += x.feat * x.nb
            sub = _Trace(autocast=autocast, cd=cd, device=device)
            sub._ids, sub.rope_nb = tr._ids, tr.rope_nb
            c.tr = sub
            x = layer_fn(c, x, i)
            per_layer.append(sub.bytes_per_token())
            # the cast cache holds these during the forward; the backward re-creates one layer's
            layer_copies.append(sub.weight_copy_params)
            c.tr = tr
            x = tr.new(x.feat, x.nb, x.rg)
        else:
            x = layer_fn(c, x, i)
            per_layer.append(tr.bytes_per_token() - before)
    if checkpointing:
        held = tr.new(ckpt_inputs, 1, False)
        tr.save(held, "checkpointed layer inputs")

    # final norm and head
    final_trains, head_trains = _head_trains(arch, params, recipe)
    head = arch.head_linear
    tr.component = "final norm + head input"
    if arch.encoder:
        # post-LN: the last layer's LN output is the final hidden state; the pooler / pre-classifier
        # and the classifier see one token per sample (negligible activations), but their trained
        # fp32 weights get autocast copies
        saves = modules_to_save(arch, recipe) if lora else []
        pool_trains = final_trains or any(
            l.name.endswith(m) for l in arch.block("final").linears for m in saves
        )  # PEFT matches modules_to_save by suffix: DistilBERT's pre_classifier ends in "classifier"
        if pool_trains and tr.autocast_in(x).key == x.key:
            # x[:, 0] is a view: the pooler keeps the whole last hidden state (no autocast copy)
            tr.save(x)
        if autocast and c.base_nb != cd:
            if final_trains and x.rg:
                tr.weight_copy_params += sum(l.weight_params for l in arch.block("final").linears)
            if head_trains and head is not None:
                tr.weight_copy_params += head.weight_params
    elif arch.model_type == "gpt2":
        x = _layernorm(c, x, final_trains)
    else:
        x = _rmsnorm(c, x, final_trains, arch.model_type in ("gemma", "gemma2"))
    tr.component = "final norm + head input"
    c.head_in_nb = x.nb  # type: ignore[attr-defined]
    if arch.head == "causal_lm" and loss_in_tiles(recipe):
        # TRL's fused head keeps its own copy of the head input x[:, :-1] (CUDA: the rows that have a
        # label; the CPU fallback: every row, reshaped -- a view when b == 1) and casts the head weight
        # per vocabulary chunk (no cached copy); a few per-token tensors for its backward
        rows = (s - 1) / s
        tr.save(x if (device == "cpu" and b == 1) else tr.new(x.feat * rows, x.nb, False), "loss")
        tr.save(tr.new(rows, TRL_SAVED_PER_TOKEN[device], False), "loss")
    elif arch.head == "causal_lm" and recipe.train.cross_entropy == "fused":
        # Liger's fused linear cross-entropy computes the head's gradients in the forward and keeps them for
        # the backward: the input gradient, tokens x hidden in the head input's dtype (the weight gradient,
        # when the head trains, is added in activation_bytes: it scales with the vocabulary, not tokens)
        tr.save(tr.new(x.feat, x.nb, False), "loss")
    elif arch.head == "causal_lm":
        if head_trains:
            head_in = tr.autocast_in(x)
            tr.save(head_in)
            tr.head_keys.add(head_in.key)
        # an fp32 head under autocast: its 16-bit copy is kept for the input gradient (cached when
        # it trains; made per call when frozen in fp32)
        if x.rg and autocast and (head_trains or c.base_nb == FP32):
            tr.weight_copy_params += arch.hidden * arch.vocab
            c.head_copy_params = arch.hidden * arch.vocab  # type: ignore[attr-defined]
        tr.save(tr.new(1, INT64, False), "loss")  # shifted labels kept by nll_loss
    elif not arch.encoder and head_trains:
        # decoder classification: `score` runs on every token, then the last token is picked
        tr.save(tr.autocast_in(x))
    c.rope_bytes = 0 if (arch.encoder or arch.model_type == "gpt2") else 2 * s * arch.head_dim * tr.rope_nb  # type: ignore[attr-defined]
    c.layer_copies = layer_copies  # type: ignore[attr-defined]
    return tr, per_layer, c


def activation_bytes(
    arch: Arch, params: ParamPlan, recipe: Recipe, *, device: Device = "cuda"
) -> ActivationBytes:
    """Activation bytes of one micro-batch (`train.micro_batch_size` × `data.max_seq_len`).

    `device` picks the kernels and autocast policy: "cuda" (the estimate) or "cpu" (what the CPU
    tests measure: dropout keeps a noise tensor of the input dtype instead of a bool mask, autocast
    keeps layer_norm/pow/softmax in the input dtype, SDPA with attention dropout runs the math path).
    """
    if arch.probe is not None:
        return _probed_bytes(arch, params, recipe, device)
    b = recipe.train.micro_batch_size
    s = recipe.data.max_seq_len
    ckpt = recipe.train.gradient_checkpointing
    tokens = b * s
    tr, per_layer, c = _run(arch, params, recipe, device, ckpt, b, s)

    detail: dict[str, int] = {}
    for comp, v in tr.by_component().items():
        detail[comp] = detail.get(comp, 0) + int(round(v * tokens))
    # cos/sin of rotary embeddings: (1, s, head_dim) each, shared by all layers and the batch
    if c.rope_bytes:  # type: ignore[attr-defined]
        detail["attention"] = detail.get("attention", 0) + c.rope_bytes  # type: ignore[attr-defined]
    saved = sum(detail.values())

    # a typical layer (input needs grad, weights as the top layer's), without checkpointing
    if ckpt:
        per_layer_b = int(round(max(per_layer) * tokens))
    else:
        full = _run(arch, params, recipe, device, False, b, s)[1]
        per_layer_b = int(round(max(full) * tokens))

    # loss buffers
    logits = 0
    if arch.head == "causal_lm" and loss_in_tiles(recipe):
        logits, detail["logits (forward peak)"] = _tiled_loss_bytes(arch, params, recipe, c, device, b, s)
    elif arch.head == "causal_lm" and recipe.train.cross_entropy == "fused":
        grad_w, logits, detail["logits (forward peak)"] = _liger_loss_bytes(arch, params, recipe, c, b, s)
        detail["loss"] = detail.get("loss", 0) + grad_w
        saved += grad_w
    elif arch.head == "causal_lm":
        logit_elems = tokens * arch.vocab
        logits = 12 * logit_elems
        detail["loss saved (log-softmax)"] = FP32 * logit_elems
        detail["logits (forward peak)"] = (FP32 + FP32 + (c.cd if c.cd != FP32 else 0)) * logit_elems
    else:
        logits = tokens // max(s, 1) * max(arch.num_labels, 1) * 16

    copies = tr.weight_copy_params * c.cd if tr.autocast else 0
    layer_copies = [n * c.cd for n in c.layer_copies] if tr.autocast else []
    transient = _backward_transient(arch, recipe, c, tokens, per_layer_b if ckpt else 0)
    if ckpt:
        detail["recomputed layer"] = per_layer_b
        transient += max(layer_copies, default=0)  # the recomputed layer's weight copies
    detail["autocast weight copies"] = copies
    detail["autocast weight copies (forward)"] = copies + sum(layer_copies)
    offloaded = 0
    if recipe.train.activation_offloading:
        head_copy = getattr(c, "head_copy_params", 0) * c.cd if tr.autocast else 0
        # under checkpointing the rotary tables reach the layers as keywords the checkpoint closure holds
        rope = 0 if ckpt else c.rope_bytes  # type: ignore[attr-defined]
        parts = offloaded_bytes(tr, tokens, device, rope, copies - head_copy, detail.get("loss saved (log-softmax)", 0))
        detail.update(parts)
        offloaded = sum(parts.values())
        detail["restored layer"] = per_layer_b if not ckpt else int(arch.hidden * tokens * max(c.base_nb, c.cd))
        detail["offload leaf kept"] = _leaf_input(arch, recipe, params, tokens, c.base_nb)
    return ActivationBytes(
        saved=saved, logits=logits, backward_transient=transient, per_layer=per_layer_b, detail=detail,
        offloaded=offloaded,
    )


def _leaf_input(arch: Arch, recipe: Recipe, params: ParamPlan, tokens: int, nb: int) -> int:
    """Under checkpointing with frozen embeddings, the first layer's input is the embedding output made to
    require grad (enable_input_require_grads): an autograd leaf, which the graph holds wherever it was
    made, so it stays on the GPU beside its host copy."""
    if recipe.train.gradient_checkpointing and not params.embeddings_train:
        return int(arch.hidden * tokens * nb)
    return 0


def offloaded_bytes(tr: _Trace, tokens: int, device: Device, rope_bytes: int, weight_copies: int,
                    loss_saved: int) -> dict[str, int]:
    """What `train.activation_offloading` moves to host RAM (launcher/train/offload.py), by part.

    Every saved storage of MIN_OFFLOAD_BYTES or more but the output head's own saves (TRL runs the head
    outside the offloader): the layers' saved tensors (under checkpointing, the layer inputs), the rotary
    tables, the autocast weight copies of the layers (the head's stays), and the loss's saved log-softmax
    of full logits. On CUDA, TRL's streamed offloader keeps a storage saved by a second op on the GPU
    (its storage dedup), so those stay; the CPU pool copies each view once.
    """
    acts = 0
    for key, (_, per_token) in tr.saved.items():
        n = per_token * tokens
        if n < MIN_OFFLOAD_BYTES or key in tr.head_keys or (device == "cuda" and key in tr.repeated):
            continue
        acts += n
    if rope_bytes >= 2 * MIN_OFFLOAD_BYTES:
        acts += rope_bytes
    return {"offloaded saved": int(acts), "offloaded weight copies": int(weight_copies),
            "offloaded loss saved": int(loss_saved)}


def _tiled_loss_bytes(arch: Arch, params: ParamPlan, recipe: Recipe, c: _Ctx, device: Device, b: int, s: int) -> tuple[int, int]:
    """(backward, forward) transient bytes of TRL's fused LM head beyond what it saves.

    One tile buffer of TRL_TOKEN_CHUNK × TRL_VOCAB_CHUNK in the compute dtype (the autocast dtype, else the
    head input's), the per-chunk casts of the input rows and of the weight when their dtype differs, the
    fp32 running statistics; the backward adds its fp32 accumulators -- the input gradient (N × h) and,
    when the head trains, the weight gradient (V × h) -- and their casts back to the parameters' dtypes.
    """
    n = b * (s - 1)
    h, v = arch.hidden, arch.vocab
    hb = c.head_in_nb  # type: ignore[attr-defined]
    cdl = c.cd if c.tr.autocast else hb
    _, head_trains = _head_trains(arch, params, recipe)
    wb = _head_weight_nb(recipe, c, head_trains)
    t = min(n, TRL_TOKEN_CHUNK)
    width = TRL_VOCAB_CHUNK if device == "cuda" else min(v, TRL_VOCAB_CHUNK)
    buf = t * TRL_VOCAB_CHUNK * cdl  # mm_buf: allocated at full chunk width
    casts = t * h * cdl * (hb != cdl) + min(v, TRL_VOCAB_CHUNK) * h * cdl * (wb != cdl)
    stats = TRL_ACCUMULATORS * FP32 * n

    def tile_temps(phase: str) -> int:
        if device == "cuda":
            return 0
        return t * width * (CPU_TILE_FP32[phase] * FP32 + CPU_TILE_BOOL[phase] * BOOL)

    forward = buf + casts + stats + tile_temps("forward")
    grads = FP32 * n * h + (hb * n * h if hb != FP32 else 0)
    if head_trains:
        grads += FP32 * v * h + (wb * v * h if wb != FP32 else 0)
    backward = buf + casts + grads + tile_temps("backward")
    return int(backward), int(forward)


def _head_weight_nb(recipe: Recipe, c: _Ctx, head_trains: bool) -> int:
    """Element size of the output head's weight as the trainer holds it."""
    if recipe.train.precision == "bf16-pure":
        return 2
    if recipe.method == "full" or (recipe.method == "freeze" and head_trains):
        return c.base_nb if recipe.method == "full" else FP32
    return c.cd


def _liger_loss_bytes(arch: Arch, params: ParamPlan, recipe: Recipe, c: _Ctx, b: int, s: int) -> tuple[int, int, int]:
    """(saved weight gradient, loss backward, forward peak) bytes of Liger's fused linear cross-entropy
    (liger_kernel/ops/fused_linear_cross_entropy.py, fused_linear_cross_entropy_forward, read 2026-12-06).

    The forward runs the head chunk by chunk -- chunk_size = next_power_of_2(ceil(BT / ceil(V / H))), at
    most BT, so one chunk's logits are about BT x H elements -- and writes each chunk's logit gradient in
    place, then accumulates grad_input (BT x H, the input's dtype) and, when the head trains, grad_weight
    (V x H, the weight's dtype); both are saved for the backward, which only scales them. Transient in
    the forward: one chunk of logits in the compute dtype, its product with the weight (chunk x H), the
    fp32 per-token loss, and under autocast the 16-bit copy of an fp32 head weight (the autocast cache
    holds it to the end of the forward). Nothing is left for the loss backward.
    """
    bt = b * s
    h, v = arch.hidden, arch.vocab
    hb = c.head_in_nb  # type: ignore[attr-defined]
    cdl = c.cd if c.tr.autocast else hb
    _, head_trains = _head_trains(arch, params, recipe)
    wb = _head_weight_nb(recipe, c, head_trains)
    inc = -(-v // h)
    chunk = min(1 << max(0, (-(-bt // inc) - 1).bit_length()), bt)
    grad_w = v * h * wb if head_trains else 0
    forward = chunk * v * cdl + chunk * h * hb + FP32 * bt + (v * h * cdl if wb != cdl else 0)
    return int(grad_w), 0, int(forward)


def _backward_transient(arch: Arch, recipe: Recipe, c: _Ctx, tokens: int, recomputed: int) -> int:
    """Bytes alive during the worst layer's backward on top of `saved` (an upper-side approximation
    calibrated on CPU live-bytes traces, not an op-by-op account):

    * the gradient of the layer output and of its input, in the residual stream's dtype: 2·res·h;
    * the MLP backward's gradients of the widest intermediates (d(act), d(up), d(gate)): 3·cd·inter;
    * with LoRA, PEFT's fp32 round trip of the widest adapted input: the fp32 copy of x and its
      dropped-out version in the forward, their fp32 gradients in the backward: 4 bytes each
      per input feature (the copy only when the input is 16-bit, the dropout one only when p > 0);
    * under gradient checkpointing the recomputed layer's saved set (`per_layer`) on top.
    """
    cd = c.cd
    res = max(c.base_nb, cd)
    inter = arch.intermediate * (max(1, arch.experts_per_token) if arch.num_experts else 1)
    per_token = 2 * res * arch.hidden + 3 * cd * inter
    widest = max((l.in_features for b, l in c.params.lora_targets if b.name == "layer"), default=0)
    if widest and recipe.method in ("lora", "qlora"):
        per_token += widest * (c.adapter_nb * (c.base_nb != c.adapter_nb) + c.adapter_nb * (c.lora_p > 0))
    return int(per_token * tokens + recomputed)


def _probed_bytes(arch: Arch, params: ParamPlan, recipe: Recipe, device: Device) -> ActivationBytes:
    """Activation bytes of an architecture taken from the model itself (launcher/estimate/probed.py):
    what each layer and the embeddings / final norm saved in the probe's fake step, fitted over its
    (batch, sequence) shapes; the head input, the loss buffers and the backward workspace as for the
    analytic families. Under gradient checkpointing each layer keeps only its input (the residual
    stream) and the backward re-creates the largest layer's saved set."""
    b = recipe.train.micro_batch_size
    s = recipe.data.max_seq_len
    ckpt = recipe.train.gradient_checkpointing
    tokens = b * s
    runs = probed.measured_runs(arch, params, recipe)
    r0 = runs[0]
    per_layer, outside = probed.saved_at(runs, b, s)
    precision = recipe.train.precision
    pure = precision == "bf16-pure"
    autocast = precision not in ("fp32", "bf16-pure")
    cd = FP32 if precision == "fp32" else 2
    lora = recipe.method in ("lora", "qlora")
    base_nb = cd if (lora or pure) else FP32
    res_nb = int(r0["out_nb"])  # the residual stream's element size: the body's output
    detail: dict[str, int] = {}
    if ckpt:
        detail["checkpointed layer inputs"] = int(len(per_layer) * tokens * arch.hidden * res_nb)
    else:
        detail["layers (measured)"] = int(sum(per_layer))
    detail["embeddings + final norm (measured)" if arch.head == "causal_lm" else "embeddings, head, loss (measured)"] = int(outside)
    copies = sum(r0["weight_copies"]) + r0["outside"]["weight_copies"]
    _, head_trains = _head_trains(arch, params, recipe)
    body_rg = recipe.method != "freeze" or recipe.freeze.trainable_layers > 0 or ckpt or params.embeddings_train
    if arch.head == "causal_lm":
        rows = (s - 1) / s
        if loss_in_tiles(recipe):
            detail["loss"] = int(tokens * rows * (arch.hidden * res_nb + TRL_SAVED_PER_TOKEN[device]))
        elif recipe.train.cross_entropy == "fused":
            detail["loss"] = int(tokens * arch.hidden * res_nb)  # Liger's grad_input (+ grad_weight below)
        else:
            head_in = 2 if (autocast and res_nb == FP32) else res_nb
            detail["final norm + head input"] = int(tokens * arch.hidden * head_in) if head_trains else 0
            detail["loss"] = tokens * INT64
            if body_rg and autocast and (head_trains or base_nb == FP32):
                copies += arch.hidden * arch.vocab * cd
    saved = sum(detail.values())
    c = SimpleNamespace(cd=cd, base_nb=base_nb, params=params, adapter_nb=2 if pure else FP32,
                        lora_p=recipe.lora.dropout, head_in_nb=res_nb, tr=SimpleNamespace(autocast=autocast))
    if arch.head == "causal_lm" and loss_in_tiles(recipe):
        logits, detail["logits (forward peak)"] = _tiled_loss_bytes(arch, params, recipe, c, device, b, s)  # type: ignore[arg-type]
    elif arch.head == "causal_lm" and recipe.train.cross_entropy == "fused":
        grad_w, logits, detail["logits (forward peak)"] = _liger_loss_bytes(arch, params, recipe, c, b, s)  # type: ignore[arg-type]
        detail["loss"] += grad_w
        saved += grad_w
    elif arch.head == "causal_lm":
        logit_elems = tokens * arch.vocab
        logits = 12 * logit_elems
        detail["loss saved (log-softmax)"] = FP32 * logit_elems
        detail["logits (forward peak)"] = (FP32 + FP32 + (cd if cd != FP32 else 0)) * logit_elems
    else:
        logits = b * max(arch.num_labels, 1) * 16
    per_layer_b = int(max(per_layer, default=0))
    transient = _backward_transient(arch, recipe, c, tokens, per_layer_b if ckpt else 0)  # type: ignore[arg-type]
    if ckpt:
        detail["recomputed layer"] = per_layer_b
    detail["autocast weight copies"] = int(copies)
    detail["autocast weight copies (forward)"] = int(copies)
    offloaded = 0
    if recipe.train.activation_offloading:
        # every measured save moves but the head's own (its input, and its weight copy under autocast)
        kept = detail.get("final norm + head input", 0)
        head_copy = arch.hidden * arch.vocab * cd if (arch.head == "causal_lm" and not loss_in_tiles(recipe)
                                                      and recipe.train.cross_entropy != "fused" and body_rg
                                                      and autocast and (head_trains or base_nb == FP32)) else 0
        parts = {"offloaded saved": int(saved - kept), "offloaded weight copies": int(copies - head_copy),
                 "offloaded loss saved": detail.get("loss saved (log-softmax)", 0)}
        detail.update(parts)
        offloaded = sum(parts.values())
        detail["restored layer"] = per_layer_b if not ckpt else int(arch.hidden * tokens * res_nb)
        detail["offload leaf kept"] = _leaf_input(arch, recipe, params, tokens, base_nb)
    return ActivationBytes(saved=int(saved), logits=int(logits), backward_transient=transient,
                           per_layer=per_layer_b, detail=detail, offloaded=offloaded)
