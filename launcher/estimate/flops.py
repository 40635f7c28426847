"""FLOPs of one training step: forward, activation and weight gradients, recomputation, attention.

Pure arithmetic over the tensor inventory (`Arch`) and the parameter plan (`ParamPlan`); no torch.
The figures are what `torch.utils.flop_counter.FlopCounterMode` reports for a real step (tests hold
them to it within 5%): matrix products only, 2 FLOPs per multiply-add. Elementwise work (norms,
activations, softmax, rotary embeddings, dropout, the loss) is not counted; it is well under 1%
of the total at realistic sizes. Embedding lookups cost nothing. docs/estimation-flops.md has the
derivation and the measured-versus-predicted table.

How the backward pass is worked out: the model is walked in order (embeddings, each layer, final
norm, head) tracking whether the hidden state requires a gradient. A Linear computes its input
gradient (2 FLOPs per weight per token) only when its input requires one, and its weight gradient
(2 per weight per token) only when its weight trains. That reproduces what autograd does:

* full: everything, 6N per token;
* freeze: nothing below the lowest trainable layer (no gradient flows there), unless gradient
  checkpointing is on: transformers' `gradient_checkpointing_enable` calls
  `enable_input_require_grads`, so the embedding output requires a gradient and autograd then
  propagates input gradients (and recomputes) through the frozen layers too;
* LoRA: base weights get no weight gradient; the adapters' A and B get theirs, and the activation
  gradient runs through base weights and adapters alike. In layer 0 without gradient checkpointing,
  the layer input (frozen embeddings, frozen norm) needs no gradient, so the projections that read
  it (q/k/v) skip their input gradients and, with eager attention, only the attention gradients that
  lead to an adapter are formed.

Attention: QK^T and AV are 2 * 2 * s^2 * heads * head_dim FLOPs per layer per sequence, the full
s x s product (as the FLOP counter and the kernels do; causal masking does not halve it). Backward:
eager attention forms dP, dV, dQ, dK (2x forward); sdpa / flash-attention kernels also recompute
QK^T inside the backward (2.5x forward, the counter's formula for those kernels).

Gradient checkpointing (non-reentrant, as ftl enables it) re-runs the forward of every decoder layer
that takes part in the backward pass. PyTorch stops the re-run as soon as the last tensor the
backward needs has been rebuilt; in pre-norm layers with nothing after the MLP's output projection
but the residual add (Llama and relatives), that projection's product itself is not re-run.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from launcher.estimate import probed
from launcher.estimate.activations import loss_in_tiles
from launcher.estimate.arch import Arch, Block, Linear
from launcher.estimate.params import ParamPlan, modules_to_save
from launcher.spec.recipe import Recipe

# Backward attention matmuls as a multiple of the forward's: eager forms dP, dV, dQ, dK; fused
# kernels (sdpa's flash / memory-efficient, flash_attention_2) also recompute the scores.
ATTN_BACKWARD_FACTOR = {"eager": 2.0, "sdpa": 2.5, "flash_attention_2": 2.5}

# Where each Linear sits in a layer's dataflow: 0 reads the layer input (through a norm), 1 reads
# the attention output, 2 reads the residual stream after attention, 3 reads the MLP's hidden.
_STAGE = {
    "q_proj": 0, "k_proj": 0, "v_proj": 0, "qkv_proj": 0, "c_attn": 0,
    "query": 0, "key": 0, "value": 0, "q_lin": 0, "k_lin": 0, "v_lin": 0,
    "o_proj": 1, "attn.c_proj": 1, "attention.output.dense": 1, "out_lin": 1,
    "gate_proj": 2, "up_proj": 2, "gate_up_proj": 2, "c_fc": 2, "intermediate.dense": 2, "lin1": 2,
    "down_proj": 3, "mlp.c_proj": 3, "output.dense": 3, "lin2": 3,
}
# Which of q, k, v a stage-0 projection produces.
_QKV = {
    "q_proj": "q", "query": "q", "q_lin": "q",
    "k_proj": "k", "key": "k", "k_lin": "k",
    "v_proj": "v", "value": "v", "v_lin": "v",
    "qkv_proj": "qkv", "c_attn": "qkv",
}
# Families whose layer ends "residual + mlp_out" with nothing saved after the last product, so the
# checkpoint re-run stops before it. Not: gemma2/olmo2 (a norm follows), gpt2 (residual dropout
# 0.1 saves a mask), bert/distilbert (post-norm), MoE (the routing weights multiply follows).
_RERUN_SKIPS_LAST = {"llama", "mistral", "qwen2", "qwen3", "gemma", "phi3"}


@dataclass(frozen=True)
class StepFlops:
    forward: int
    backward_input: int  # activation gradients (linears and attention) where autograd needs them
    backward_weight: int  # weight gradients of what trains (LoRA: the adapters' own products)
    recompute: int  # gradient checkpointing: the forward re-run of checkpointed layers
    attention: int  # the s^2 attention products, already inside the figures above
    total: int
    per_token_model: int  # 6 * N per token over the dense products (N: active matmul weights, head included)

    def scaled(self, n: int) -> "StepFlops":
        """n sequences' worth (per_token_model stays per token)."""
        return replace(
            self,
            forward=self.forward * n,
            backward_input=self.backward_input * n,
            backward_weight=self.backward_weight * n,
            recompute=self.recompute * n,
            attention=self.attention * n,
            total=self.total * n,
        )


def _stage(linear: Linear) -> int:
    return _STAGE.get(linear.name, _STAGE.get(linear.short, 0))


def _qkv(linear: Linear) -> str:
    return _QKV.get(linear.short, "")


def _named(linear: Linear, names: set[str]) -> bool:
    return linear.short in names or linear.name in names


@dataclass
class _Tally:
    forward: int = 0
    backward_input: int = 0
    backward_weight: int = 0
    recompute: int = 0
    attention: int = 0


def input_requires_grad(params: ParamPlan, recipe: Recipe) -> bool:
    """Whether the embedding output carries a gradient: the embeddings train, or gradient
    checkpointing is on (transformers then calls `enable_input_require_grads`)."""
    return params.embeddings_train or recipe.train.gradient_checkpointing


def _probed_flops(arch: Arch, params: ParamPlan, recipe: Recipe, s: int) -> StepFlops:
    """FLOPs of one sequence for an architecture taken from the model itself: the body's forward and
    backward as the probe's FlopCounterMode counted them (fitted over its two sequence lengths; the
    backward's input and weight gradients together, under `backward_input`), the head as below."""
    runs = probed.measured_runs(arch, params, recipe)
    eager = recipe.train.attn_implementation == "eager"  # its s x s products are in the counter's matmuls

    def at(get, shape: str) -> int:
        return int(round(probed.fit(runs, get, batch=False, shape=shape).at(1, s)))

    n = len(runs[0]["forward_flops"])
    # the probe's attention figures (forward + 2.5x forward backward) are pure s^2: fitted apart from the
    # matmuls, which grow linearly (plus a constant per sequence: a convolution's padding)
    attn = [at(lambda r: r["attention_flops"][i], "s2") for i in range(n)]
    mm = "s+s2" if eager else "s+1"
    layer_fwd = [at(lambda r: r["forward_flops"][i] - r["attention_flops"][i] / 3.5, mm) + attn[i] / 3.5 for i in range(n)]
    layer_bwd = [at(lambda r: r["backward_flops"][i] - r["attention_flops"][i] * 2.5 / 3.5, mm) + attn[i] * 2.5 / 3.5
                 for i in range(n)]
    forward = int(sum(layer_fwd)) + at(lambda r: r["outside"]["forward_flops"], mm)
    backward = int(sum(layer_bwd)) + at(lambda r: r["outside"]["backward_flops"], mm)
    attention = int(sum(attn))
    ckpt = recipe.train.gradient_checkpointing
    recompute = int(sum(layer_fwd)) if ckpt else 0
    bwd_weight = 0
    if arch.head == "causal_lm":
        w = arch.hidden * arch.vocab
        rows = s - 1 if loss_in_tiles(recipe) else s
        head_trains = recipe.method == "full" or (recipe.method == "freeze" and recipe.freeze.train_head)
        body_rg = recipe.method != "freeze" or recipe.freeze.trainable_layers > 0 or ckpt
        forward += 2 * w * rows
        backward += 2 * w * rows if body_rg else 0
        bwd_weight = 2 * w * rows if head_trains else 0
        if loss_in_tiles(recipe):
            recompute += 2 * w * rows
    total = forward + backward + bwd_weight + recompute
    attn_fwd = int(attention / 3.5)  # the probe's attention figures are forward + backward (2.5x forward)
    return StepFlops(forward=forward, backward_input=backward, backward_weight=bwd_weight, recompute=recompute,
                     attention=attention + (attn_fwd if ckpt else 0), total=total,
                     per_token_model=int(3 * (forward - attn_fwd) // max(1, s)))


def flops_per_sequence(arch: Arch, params: ParamPlan, recipe: Recipe, *, seq_len: int | None = None) -> StepFlops:
    """FLOPs to train on one sequence of `recipe.data.max_seq_len` tokens (or `seq_len`), forward and backward."""
    s = seq_len or recipe.data.max_seq_len
    if arch.probe is not None:
        return _probed_flops(arch, params, recipe, s)
    method = recipe.method
    lora = method in ("lora", "qlora")
    r = recipe.lora.r
    targets = {(b.name, l.name) for b, l in params.lora_targets}
    saved = set(modules_to_save(arch, recipe)) if lora else set()
    k = min(recipe.freeze.trainable_layers, arch.layers) if method == "freeze" else 0
    checkpointing = recipe.train.gradient_checkpointing
    attn_bwd = ATTN_BACKWARD_FACTOR.get(recipe.train.attn_implementation, 2.5)
    t = _Tally()
    dense = 0  # base-model matmul FLOPs of the forward, for per_token_model

    def linear(block: Block, lin: Linear, tokens: int, base_trains: bool, rg_in: bool) -> tuple[int, bool]:
        """Adds one Linear's FLOPs; returns (its forward FLOPs, whether its output needs a gradient)."""
        nonlocal dense
        w = lin.weight_params
        fwd = 2 * w * tokens
        dense += fwd
        trains = base_trains or (lora and _named(lin, saved))  # a modules_to_save copy trains in full
        t.backward_weight += fwd if trains else 0
        t.backward_input += fwd if rg_in else 0
        adapted = (block.name, lin.name) in targets
        if adapted:
            a_fwd = 2 * r * lin.in_features * tokens
            b_fwd = 2 * r * lin.out_features * tokens
            fwd += a_fwd + b_fwd
            t.backward_weight += a_fwd + b_fwd
            t.backward_input += b_fwd + (a_fwd if rg_in else 0)  # through B always (A needs it), through A if x needs it
        t.forward += fwd
        return fwd, rg_in or trains or adapted

    # Embeddings: lookups, no FLOPs. Does their output carry a gradient?
    rg = input_requires_grad(params, recipe)

    layer = arch.layer
    attn_fwd = 2 * 2 * s * s * arch.heads * arch.head_dim  # QK^T and AV, per layer per sequence
    moe_active = (layer.expert_params * arch.experts_per_token // arch.num_experts) if arch.num_experts else 0
    router = layer.other.get("mlp.gate", 0) if arch.num_experts else 0
    for i in range(arch.layers):
        base_trains = method == "full" or (method == "freeze" and i >= arch.layers - k)
        # Pre-norm layers: the trainable input norm gives every Linear's input a gradient. Post-norm
        # encoders: the lowest trainable layer's q/k/v read the frozen layer below directly.
        x_rg = rg or (base_trains and not arch.encoder)
        out_rg = {0: False, 1: False, 2: False, 3: False}  # per stage: does some output need a gradient
        qkv_rg = {"q": False, "k": False, "v": False}
        layer_fwd = 0
        last_rerun_skip = 0
        for lin in layer.linears:
            st = _stage(lin)
            rg_in = x_rg or any(out_rg[j] for j in range(st))
            fwd, o = linear(layer, lin, s, base_trains, rg_in)
            layer_fwd += fwd
            out_rg[st] = out_rg[st] or o
            for c in _qkv(lin):
                qkv_rg[c] = qkv_rg[c] or o
            if st == 3:  # the re-run stops before the layer's last product (LoRA: before B's)
                adapted = (layer.name, lin.name) in targets
                last_rerun_skip = 2 * r * lin.out_features * s if adapted else 2 * lin.weight_params * s
        if arch.num_experts:  # fused experts (3-D parameters) and the router: stage 2 -> 3
            rg_in = x_rg or any(out_rg[j] for j in range(2))
            fwd = 2 * (moe_active + router) * s
            dense += fwd
            t.forward += fwd
            layer_fwd += fwd
            t.backward_weight += fwd if base_trains else 0
            t.backward_input += fwd if rg_in else 0
            out_rg[3] = out_rg[3] or rg_in or base_trains
        # attention core
        t.forward += attn_fwd
        layer_fwd += attn_fwd
        t.attention += attn_fwd
        if not qkv_rg["q"] and not qkv_rg["k"] and not qkv_rg["v"] and x_rg:
            qkv_rg = {"q": True, "k": True, "v": True}  # unknown projection names: assume the input's
        if any(qkv_rg.values()):
            if recipe.train.attn_implementation == "eager":
                half = attn_fwd // 2  # one of the four backward products
                bwd = half * (int(qkv_rg["q"] or qkv_rg["k"]) + qkv_rg["v"] + qkv_rg["q"] + qkv_rg["k"])
            else:
                bwd = int(attn_bwd * attn_fwd)
            t.backward_input += bwd
            t.attention += bwd
        layer_rg = x_rg or any(out_rg.values()) or any(qkv_rg.values())
        if checkpointing and layer_rg:
            skip = last_rerun_skip if arch.model_type in _RERUN_SKIPS_LAST and not arch.num_experts else 0
            t.recompute += layer_fwd - skip
            t.attention += attn_fwd
        rg = layer_rg

    # Final block: a norm (decoders) or a pooler / pre-classifier on the first token (encoders).
    final_trains = method in ("full", "freeze")
    tokens_after = 1 if arch.encoder else s
    final = arch.block("final")
    for lin in final.linears:
        _, o = linear(final, lin, tokens_after, final_trains, rg)
        rg = rg or o
    rg = rg or (final_trains and bool(final.other))  # a trainable final norm needs the head's input gradient

    # Head: lm_head, classifier, or the embedding matrix when tied.
    head = arch.block("head")
    head_linears = list(head.linears)
    if not head_linears and arch.head == "causal_lm":
        head_linears = [Linear("lm_head", arch.hidden, arch.vocab)]  # tied: same product
    head_trains = method == "full" or (method == "freeze" and recipe.freeze.train_head)
    tiled = arch.head == "causal_lm" and loss_in_tiles(recipe)
    for lin in head_linears:
        if tiled:
            # TRL's fused LM head: the s - 1 rows that have a next token, and the product once more in the
            # backward (each tile is recomputed there to turn it into the logits' gradient)
            linear(head, lin, s - 1, head_trains, rg)
            t.recompute += 2 * lin.weight_params * (s - 1)
        else:
            linear(head, lin, tokens_after, head_trains, rg)

    total = t.forward + t.backward_input + t.backward_weight + t.recompute
    return StepFlops(
        forward=t.forward,
        backward_input=t.backward_input,
        backward_weight=t.backward_weight,
        recompute=t.recompute,
        attention=t.attention,
        total=total,
        per_token_model=3 * dense // s,
    )


def flops_per_step(
    arch: Arch, params: ParamPlan, recipe: Recipe, sequences_per_step: int, *, seq_len: int | None = None
) -> StepFlops:
    """FLOPs of one optimizer step over `sequences_per_step` sequences of `max_seq_len` (or `seq_len`)
    tokens: micro_batch_size * grad_accum for one rank, times the data-parallel ranks for the job."""
    return flops_per_sequence(arch, params, recipe, seq_len=seq_len).scaled(sequences_per_step)
