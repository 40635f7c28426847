"""A model as an inventory of its tensors, derived from config.json alone.

Everything the estimator says about parameters, quantization, LoRA and sharding is a sum over this
inventory, so it must list exactly the tensors transformers builds (tests compare it with a model
built on the meta device). No torch here: `ftl estimate` must answer without importing it.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Literal

Head = Literal["causal_lm", "seq_cls"]

ENCODER_TYPES = {"bert", "distilbert"}
# Bytes per parameter of a checkpoint, by the dtype config.json names
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "bf16": 2, "fp16": 2, "fp32": 4}
LLAMA_LIKE = {"llama", "mistral", "qwen2", "qwen3", "mixtral", "gemma", "gemma2", "phi3", "olmo2"}


class ArchError(ValueError):
    """The config describes an architecture ftl cannot take apart."""


@dataclass(frozen=True)
class Linear:
    """One nn.Linear (or GPT-2 Conv1D): the unit that LoRA adapts and bitsandbytes quantizes."""

    name: str  # module name inside its block, e.g. "self_attn.q_proj"
    in_features: int
    out_features: int
    bias: bool = False
    conv1d: bool = False  # GPT-2's Conv1D stores its weight as (in, out)

    @property
    def short(self) -> str:
        return self.name.rsplit(".", 1)[-1]

    @property
    def weight_params(self) -> int:
        return self.in_features * self.out_features

    @property
    def params(self) -> int:
        return self.weight_params + (self.out_features if self.bias else 0)


@dataclass(frozen=True)
class Block:
    """A group of modules repeated `count` times (a decoder layer) or present once (embeddings)."""

    name: str  # "embeddings", "layer", "final", "head"
    count: int
    linears: tuple[Linear, ...] = ()
    # Parameters outside Linear modules: embeddings, norms, routers, fused MoE experts.
    other: dict[str, int] = field(default_factory=dict)
    # Fused MoE expert weights (transformers 5 stores them as 3-D parameters, not Linear modules).
    expert_params: int = 0
    # Probed architectures only (launcher/estimate/probed.py): the shape and owning module's size of
    # every parameter of the block by its name inside the block, and the layer indices it stands for.
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    modules: dict[str, int] = field(default_factory=dict)
    indices: tuple[int, ...] = ()

    @property
    def params(self) -> int:
        return sum(l.params for l in self.linears) + sum(self.other.values()) + self.expert_params


@dataclass(frozen=True)
class Arch:
    model_type: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    max_positions: int
    gated_mlp: bool
    encoder: bool
    tie_embeddings: bool
    head: Head
    num_labels: int
    num_experts: int
    experts_per_token: int
    dtype: str  # the dtype the checkpoint is published in
    blocks: tuple[Block, ...]
    # Training-time dropout probabilities (embd, resid, attn, classifier): dropout keeps masks for backward.
    dropout: dict[str, float] = field(default_factory=dict)
    # Set for architectures taken from the model itself (launcher/estimate/probed.py): where its
    # inventory and step measurements are cached; activations and FLOPs then come from those.
    probe: Any = None
    buffers: int | None = None  # registered buffer bytes, when measured
    active: int | None = None  # parameters per token, when the probe counted the routed experts

    def block(self, name: str) -> Block:
        return next(b for b in self.blocks if b.name == name)

    @property
    def layer(self) -> Block:
        """The (first kind of) decoder / encoder layer; `layer_blocks` has every kind."""
        return self.block("layer")

    @property
    def layer_blocks(self) -> list[Block]:
        return [b for b in self.blocks if b.name == "layer"]

    def top_layers(self, block: Block, k: int) -> int:
        """How many of `block`'s layers are among the top k of the model (freeze trains those)."""
        first = self.layers - k
        indices = block.indices or range(self.layers - block.count, self.layers)
        return sum(1 for i in indices if i >= first)

    @property
    def params_total(self) -> int:
        return sum(b.count * b.params for b in self.blocks)

    @property
    def params_active(self) -> int:
        """Parameters one token passes through: MoE counts only the routed experts."""
        if self.active is not None:
            return self.active
        if not self.num_experts:
            return self.params_total
        idle = self.layer.expert_params * (self.num_experts - self.experts_per_token) // self.num_experts
        return self.params_total - self.layers * idle

    @property
    def published_bytes(self) -> int:
        """Size of the weights as published (what a download fetches): parameters × the config's dtype."""
        return self.params_total * DTYPE_BYTES.get(self.dtype.replace("torch.", ""), 2)

    @property
    def params_per_layer(self) -> int:
        """Parameters of the largest layer."""
        return max(b.params for b in self.layer_blocks)

    @property
    def head_linear(self) -> Linear | None:
        """The output projection (lm_head or classifier), None when tied to the embeddings."""
        head = self.block("head")
        return head.linears[-1] if head.linears else None

    def linears(self) -> list[tuple[Block, Linear]]:
        return [(b, l) for b in self.blocks for l in b.linears]


def _get(cfg: dict[str, Any], *keys: str, default: Any = None) -> Any:
    for key in keys:
        if cfg.get(key) is not None:
            return cfg[key]
    return default


def _head_block(cfg: dict[str, Any], hidden: int, vocab: int, head: Head, num_labels: int, tie: bool) -> Block:
    if head == "seq_cls":
        return Block("head", 1, (Linear("score", hidden, num_labels),))
    if tie:
        return Block("head", 1)
    return Block("head", 1, (Linear("lm_head", hidden, vocab),))


def _make(cfg: dict[str, Any], head: Head, num_labels: int, **fields: Any) -> Arch:
    """An Arch with the defaults every family shares (dense, decoder, published dtype)."""
    fields.setdefault("kv_heads", fields["heads"])
    fields.setdefault("head_dim", fields["hidden"] // fields["heads"])
    fields.setdefault("num_experts", 0)
    fields.setdefault("experts_per_token", 0)
    fields.setdefault("encoder", False)
    fields.setdefault("gated_mlp", False)
    return Arch(head=head, num_labels=num_labels, dtype=str(_get(cfg, "torch_dtype", "dtype", default="float32")), **fields)


def _llama_like(cfg: dict[str, Any], head: Head, num_labels: int) -> Arch:
    mt = cfg["model_type"]
    h = cfg["hidden_size"]
    n_heads = cfg["num_attention_heads"]
    kv = _get(cfg, "num_key_value_heads", default=n_heads)
    hd = _get(cfg, "head_dim", default=h // n_heads)
    inter = cfg["intermediate_size"]
    vocab = cfg["vocab_size"]
    layers = cfg["num_hidden_layers"]
    tie = bool(cfg.get("tie_word_embeddings", mt in {"gemma", "gemma2"}))
    attn_bias = bool(cfg.get("attention_bias", mt == "qwen2"))
    mlp_bias = bool(cfg.get("mlp_bias", False))
    experts = int(_get(cfg, "num_local_experts", "num_experts", default=0) or 0)
    per_tok = int(_get(cfg, "num_experts_per_tok", default=0) or 0)

    if mt == "phi3":
        attn = (
            Linear("self_attn.qkv_proj", h, (n_heads + 2 * kv) * hd),
            Linear("self_attn.o_proj", n_heads * hd, h),
        )
    elif mt == "qwen2":  # q, k, v carry a bias, o does not
        attn = (
            Linear("self_attn.q_proj", h, n_heads * hd, True),
            Linear("self_attn.k_proj", h, kv * hd, True),
            Linear("self_attn.v_proj", h, kv * hd, True),
            Linear("self_attn.o_proj", n_heads * hd, h),
        )
    else:
        attn = (
            Linear("self_attn.q_proj", h, n_heads * hd, attn_bias),
            Linear("self_attn.k_proj", h, kv * hd, attn_bias),
            Linear("self_attn.v_proj", h, kv * hd, attn_bias),
            Linear("self_attn.o_proj", n_heads * hd, h, attn_bias),
        )
    expert_params = 0
    other: dict[str, int] = {}
    if experts:
        mlp: tuple[Linear, ...] = ()
        other["mlp.gate"] = experts * h  # router
        expert_params = experts * (2 * inter * h + h * inter)
    elif mt == "phi3":
        mlp = (Linear("mlp.gate_up_proj", h, 2 * inter), Linear("mlp.down_proj", inter, h))
    else:
        mlp = (
            Linear("mlp.gate_proj", h, inter, mlp_bias),
            Linear("mlp.up_proj", h, inter, mlp_bias),
            Linear("mlp.down_proj", inter, h, mlp_bias),
        )
    norms = 4 if mt == "gemma2" else 2
    other["norms"] = norms * h
    if mt in {"qwen3", "olmo2"}:  # per-head q/k norms
        other["qk_norms"] = 2 * hd if mt == "qwen3" else (n_heads + kv) * hd

    return _make(
        cfg,
        head,
        num_labels,
        model_type=mt,
        hidden=h,
        layers=layers,
        heads=n_heads,
        kv_heads=kv,
        head_dim=hd,
        intermediate=inter,
        vocab=vocab,
        max_positions=int(_get(cfg, "max_position_embeddings", default=4096)),
        gated_mlp=True,
        tie_embeddings=tie and head == "causal_lm",
        num_experts=experts,
        experts_per_token=per_tok,
        blocks=(
            Block("embeddings", 1, other={"embed_tokens": vocab * h}),
            Block("layer", layers, attn + mlp, other, expert_params),
            Block("final", 1, other={"norm": h}),
            _head_block(cfg, h, vocab, head, num_labels, tie),
        ),
    )


def _gpt2(cfg: dict[str, Any], head: Head, num_labels: int) -> Arch:
    h = cfg.get("n_embd", 768)
    layers = cfg.get("n_layer", 12)
    n_heads = cfg.get("n_head", 12)
    inter = cfg.get("n_inner") or 4 * h
    vocab = cfg.get("vocab_size", 50257)
    pos = cfg.get("n_positions", 1024)
    layer = (
        Linear("attn.c_attn", h, 3 * h, True),
        Linear("attn.c_proj", h, h, True),
        Linear("mlp.c_fc", h, inter, True),
        Linear("mlp.c_proj", inter, h, True),
    )
    tie = bool(cfg.get("tie_word_embeddings", True))
    return _make(
        cfg,
        head,
        num_labels,
        model_type="gpt2",
        hidden=h,
        layers=layers,
        heads=n_heads,
        intermediate=inter,
        vocab=vocab,
        max_positions=pos,
        tie_embeddings=tie and head == "causal_lm",
        blocks=(
            Block("embeddings", 1, other={"wte": vocab * h, "wpe": pos * h}),
            Block("layer", layers, layer, {"norms": 4 * h}),
            Block("final", 1, other={"ln_f": 2 * h}),
            _head_block(cfg, h, vocab, head, num_labels, tie),
        ),
    )


def _bert(cfg: dict[str, Any], head: Head, num_labels: int) -> Arch:
    h = cfg.get("hidden_size", 768)
    inter = cfg.get("intermediate_size", 3072)
    vocab = cfg.get("vocab_size", 30522)
    pos = cfg.get("max_position_embeddings", 512)
    types = cfg.get("type_vocab_size", 2)
    layer = (
        Linear("attention.self.query", h, h, True),
        Linear("attention.self.key", h, h, True),
        Linear("attention.self.value", h, h, True),
        Linear("attention.output.dense", h, h, True),
        Linear("intermediate.dense", h, inter, True),
        Linear("output.dense", inter, h, True),
    )
    return _make(
        cfg,
        head,
        num_labels,
        model_type="bert",
        hidden=h,
        layers=cfg.get("num_hidden_layers", 12),
        heads=cfg.get("num_attention_heads", 12),
        intermediate=inter,
        vocab=vocab,
        max_positions=pos,
        encoder=True,
        tie_embeddings=False,
        blocks=(
            Block("embeddings", 1, other={"word": vocab * h, "position": pos * h, "token_type": types * h, "norm": 2 * h}),
            Block("layer", cfg.get("num_hidden_layers", 12), layer, {"norms": 4 * h}),
            Block("final", 1, (Linear("pooler.dense", h, h, True),)),
            Block("head", 1, (Linear("classifier", h, num_labels, True),)),
        ),
    )


def _distilbert(cfg: dict[str, Any], head: Head, num_labels: int) -> Arch:
    h = cfg.get("dim", 768)
    inter = cfg.get("hidden_dim", 3072)
    vocab = cfg.get("vocab_size", 30522)
    pos = cfg.get("max_position_embeddings", 512)
    n_heads = cfg.get("n_heads", 12)
    layer = (
        Linear("attention.q_lin", h, h, True),
        Linear("attention.k_lin", h, h, True),
        Linear("attention.v_lin", h, h, True),
        Linear("attention.out_lin", h, h, True),
        Linear("ffn.lin1", h, inter, True),
        Linear("ffn.lin2", inter, h, True),
    )
    return _make(
        cfg,
        head,
        num_labels,
        model_type="distilbert",
        hidden=h,
        layers=cfg.get("n_layers", 6),
        heads=n_heads,
        intermediate=inter,
        vocab=vocab,
        max_positions=pos,
        encoder=True,
        tie_embeddings=False,
        blocks=(
            Block("embeddings", 1, other={"word": vocab * h, "position": pos * h, "norm": 2 * h}),
            Block("layer", cfg.get("n_layers", 6), layer, {"norms": 4 * h}),
            Block("final", 1, (Linear("pre_classifier", h, h, True),)),
            Block("head", 1, (Linear("classifier", h, num_labels, True),)),
        ),
    )


SUPPORTED = sorted(LLAMA_LIKE | ENCODER_TYPES | {"gpt2"})


def dropout_from_config(cfg: dict) -> dict[str, float]:
    """Training-time dropout probabilities from a config.json dict, under the keys this module uses:
    embd (after the embeddings), resid (after attention / MLP outputs), attn (attention
    probabilities), classifier. Meant for Arch (a `dropout` field); missing keys mean 0."""
    mt = cfg.get("model_type")

    def g(*keys: str, default: float = 0.0) -> float:
        for k in keys:
            if cfg.get(k) is not None:
                return float(cfg[k])
        return default

    if mt == "gpt2":
        return {"embd": g("embd_pdrop", default=0.1), "resid": g("resid_pdrop", default=0.1),
                "attn": g("attn_pdrop", default=0.1)}
    if mt == "bert":
        hid = g("hidden_dropout_prob", default=0.1)
        return {"embd": hid, "resid": hid, "attn": g("attention_probs_dropout_prob", default=0.1),
                "classifier": g("classifier_dropout", default=hid)}
    if mt == "distilbert":
        return {"embd": g("dropout", default=0.1), "resid": g("dropout", default=0.1),
                "attn": g("attention_dropout", default=0.1), "classifier": g("seq_classif_dropout", default=0.2)}
    return {"attn": g("attention_dropout", default=0.0)}


def arch_from_config(cfg: dict[str, Any], head: Head = "causal_lm", num_labels: int = 2) -> Arch:
    """Build the tensor inventory for `cfg` (a config.json dict) with the given output head."""
    mt = cfg.get("model_type")
    if mt in ENCODER_TYPES and head != "seq_cls":
        raise ArchError(f"{mt} is an encoder: ftl trains it only for tasks that score sequences (classification, reward)")
    builders = {"gpt2": _gpt2, "bert": _bert, "distilbert": _distilbert, **{t: _llama_like for t in LLAMA_LIKE}}
    if mt in builders:
        return replace(builders[mt](cfg, head, num_labels), dropout=dropout_from_config(cfg))
    raise ArchError(f"model_type {mt!r} is not supported; supported: {', '.join(SUPPORTED)}")
