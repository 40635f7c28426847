"""Model-state memory per device: weights, gradients, optimizer state, sharding and CPU offload.

Pure arithmetic over the tensor inventory of `arch` (no torch here). Every rule below was measured
on the versions ftl pins (torch 2.13, transformers 5.24, peft 0.21, bitsandbytes 0.50.2,
accelerate 1.15, deepspeed 0.19.8); docs/estimation-states.md gives the measurements and the
per-parameter bytes for every method x precision x strategy, and tests/test_states.py and
tests/test_sharding.py compare the figures with the tensors the libraries really hold.

Conventions (what ftl's trainer does; the estimate follows them):
* full: fp32 weights under DDP (torch AMP casts for compute), fp32 grads, AdamW moments in fp32.
  DeepSpeed with bf16/fp16 casts the module to 16 bit and keeps an fp32 master partition.
  FSDP2 keeps fp32 shards and all-gathers them in the compute dtype (MixedPrecisionPolicy).
* lora: frozen base in the compute dtype; PEFT upcasts the adapters to fp32; modules_to_save copies
  keep the dtype of the module they copy (PEFT does not upcast them, so they train in bf16).
* qlora: lora's model with every Linear but the output head in NF4 (bitsandbytes): the trainer puts
  what prepare_model_for_kbit_training upcast to fp32 (embeddings, norms, lm_head, biases) back in
  the compute dtype, and modules_to_save copies in the dtype of the module they copy, as with lora.
  Under ZeRO-3/FSDP the packed NF4 bytes are stored as the compute dtype (bnb_4bit_quant_storage)
  and sharded like any parameter; the quantization constants stay whole on every rank (measured).
* freeze: frozen part in the compute dtype, trainable part upcast to fp32.
* bf16-pure (any method; DDP and FSDP2 only): every parameter in bf16, LoRA adapters and trained
  weights included, so gradients and torch AdamW moments are bf16 too (2 + 2 + 4 bytes per trained
  parameter; bitsandbytes' 8-bit states as ever). No autocast, no fp32 master anywhere.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from launcher.estimate.arch import Arch, Block, Linear
from launcher.estimate.params import ParamPlan, modules_to_save
from launcher.spec.recipe import PURE_BF16_STRATEGIES, STRATEGIES, Recipe

PRECISION_BYTES = {"fp32": 4, "bf16": 2, "bf16-pure": 2, "fp16": 2}

# bitsandbytes 0.50.2 4-bit storage (Params4bit + QuantState)
NF4_BLOCK = 64  # weights per absmax
NF4_CODE_BYTES = 16 * 4  # the 16-value fp32 code table, one copy per Linear4bit
DQ_BLOCK = 256  # absmax values per second-level constant with double quantization
DQ_CODE_BYTES = 256 * 4  # the 8-bit dynamic map of state2, one copy per Linear4bit
DQ_OFFSET_BYTES = 4  # fp32 mean subtracted from the absmax before quantizing them

# bitsandbytes 8-bit optimizers (Optimizer2State)
BNB_MIN_8BIT_SIZE = 4096  # tensors with fewer elements keep two fp32 states
BNB_STATE_BLOCK = 256  # elements per fp32 absmax of each 8-bit state
BNB_QMAP_BYTES = 2 * 256 * 4  # "dynamic" and "udynamic" maps, once per optimizer and device
BNB_PAGED_MIN_NUMEL = 100_000  # paged optimizers page only tensors at least this large

# DeepSpeed configuration ftl writes: Accelerate's "auto" values (set from hidden_size) for the
# bucket sizes, DeepSpeed's defaults for the rest.
DS_SUB_GROUP_SIZE = 1_000_000_000  # ZeRO-3 optimizer sub-group (elements)


def ds_reduce_bucket(arch: Arch) -> int:
    """reduce_bucket_size ("auto" = hidden_size^2 elements)."""
    return arch.hidden * arch.hidden


def ds_prefetch_bucket(arch: Arch) -> int:
    """stage3_prefetch_bucket_size ("auto" = 0.9 * hidden_size^2 elements)."""
    return int(0.9 * arch.hidden * arch.hidden)


def ds_persistence_threshold(arch: Arch) -> int:
    """stage3_param_persistence_threshold ("auto" = 10 * hidden_size): smaller params stay whole."""
    return 10 * arch.hidden


DS_OVERLAP_COMM = {"zero1": False, "zero2": False, "zero3": True}  # DeepSpeed's defaults per stage

# torch DDP as Accelerate builds it: gradient_as_bucket_view=False, so the reducer's flat buckets
# (one gradient-sized copy of every trainable parameter) sit beside the .grad tensors.
DDP_GRADIENT_AS_BUCKET_VIEW = False

# torch.optim.AdamW picks foreach=True on CUDA: one exp_avg_sq-sized temporary at the step.
ADAMW_FOREACH = True


@dataclass(frozen=True)
class StateBytes:
    weights: int  # per device: everything held as weights, incl. gathered layers in flight
    gathered: int  # the part of `weights` that is transiently gathered layers (ZeRO-3/FSDP)
    gradients: int  # per device: gradients and their communication buffers at their peak
    optimizer: int  # per device: optimizer state (+ fp32 master weights where kept)
    step_temp: int  # transient bytes at the optimizer step
    cpu: int  # host RAM per node for CPU offload (0 without offload)
    detail: dict[str, int] = field(default_factory=dict)
    # The part of `gradients` that stays allocated between micro-batches (gradient shard/partition,
    # DDP buckets, ZeRO-3 reduce bucket); the rest only exists during backward or the step.
    gradients_kept: int = 0
    # The gradient lines by phase: "kept" (in `gradients`), "backward" (buckets and unsharded
    # gradients in flight) and "step" (fp32 gradient copies); `gradients` holds the larger of the
    # last two, so the other one is only listed here.
    phases: dict[str, dict[str, int]] = field(default_factory=dict)

    @property
    def device_total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.step_temp


# ---------------------------------------------------------------------------------------------
# Tensor inventory


@dataclass(frozen=True)
class Tensor:
    """`count` identical tensors of shape (rows, cols): what FSDP shards (dim 0) and bnb sizes."""

    name: str
    rows: int
    cols: int
    count: int
    unit: str  # FSDP unit: "embed", "layer", "tail", "root"
    module: int  # parameters of the module that owns it (ZeRO-3 gathers per module)
    role: str = "base"  # "base", "adapter", "copy"
    trainable: bool = False
    quantized: bool = False

    @property
    def numel(self) -> int:
        return self.rows * self.cols


_EMBED_KEYS = ("embed_tokens", "wte", "word")
_NORM_KEYS = ("norms", "norm", "ln_f")


def _split_other(arch: Arch, key: str, n: int) -> list[tuple[int, int]]:
    """(rows, cols) of the tensors behind one `Block.other` entry."""
    h = arch.hidden
    if key == "qk_norms":
        if arch.model_type == "olmo2":
            return [(arch.heads * arch.head_dim, 1), (arch.kv_heads * arch.head_dim, 1)]
        return [(arch.head_dim, 1)] * max(1, n // arch.head_dim)
    if key in _NORM_KEYS and n % h == 0:
        return [(h, 1)] * (n // h)
    if n % h == 0 and n > h:  # embeddings and routers: (rows, hidden)
        return [(n // h, h)]
    return [(n, 1)]


def _unit(arch: Arch, block: Block, key: str) -> str:
    """Accelerate 1.15's FSDP2 layout: decoder layers; the input embedding; a tail of the final
    norm and the output embedding (reshard_after_forward=False); the root holds the rest."""
    if block.name == "layer":
        return "layer"
    if block.name == "embeddings":
        if key in _EMBED_KEYS:
            return "tail" if arch.tie_embeddings else "embed"
        return "root"
    if block.name == "final":
        if arch.probe is not None:
            return "tail" if not arch.encoder else "root"
        return "tail" if key in _NORM_KEYS and not arch.encoder else "root"
    return "tail" if arch.head == "causal_lm" else "root"  # head


def _probed_tensors(arch: Arch, b: Block) -> list[tuple[Block, Linear | None, Tensor]]:
    """A probed block's parameters with their real shapes (FSDP2 shards dim 0) and owning modules."""
    by_module = {l.name: l for l in b.linears}
    out: list[tuple[Block, Linear | None, Tensor]] = []
    for name, shape in b.shapes.items():
        module, _, _ = name.rpartition(".")
        lin = by_module.get(module)
        key = "embed_tokens" if name == "embed_tokens" else (lin.short if lin else name)
        rows = shape[0] if shape else 1
        cols = 1
        for d in shape[1:]:
            cols *= d
        out.append((b, lin, Tensor(f"{b.name}.{name}", rows, cols, b.count, _unit(arch, b, key), b.modules.get(name, rows * cols))))
    return out


def _base_tensors(arch: Arch) -> list[tuple[Block, Linear | None, Tensor]]:
    out: list[tuple[Block, Linear | None, Tensor]] = []
    for b in arch.blocks:
        if b.shapes:
            out += _probed_tensors(arch, b)
            continue
        for l in b.linears:
            rows, cols = (l.in_features, l.out_features) if arch.model_type == "gpt2" else (l.out_features, l.in_features)
            unit = _unit(arch, b, l.short)
            out.append((b, l, Tensor(f"{b.name}.{l.name}.weight", rows, cols, b.count, unit, l.params)))
            if l.bias:
                out.append((b, l, Tensor(f"{b.name}.{l.name}.bias", l.out_features, 1, b.count, unit, l.params)))
        for key, n in b.other.items():
            unit = _unit(arch, b, key)
            for i, (rows, cols) in enumerate(_split_other(arch, key, n)):
                module = rows * cols if key not in _NORM_KEYS else arch.hidden * (2 if arch.encoder or arch.model_type == "gpt2" else 1)
                out.append((b, None, Tensor(f"{b.name}.{key}.{i}", rows, cols, b.count, unit, module)))
        if b.expert_params:
            e, h, inter = arch.num_experts, arch.hidden, arch.intermediate
            out.append((b, None, Tensor(f"{b.name}.experts.gate_up_proj", e, 2 * inter * h, b.count, "layer", b.expert_params)))
            out.append((b, None, Tensor(f"{b.name}.experts.down_proj", e, h * inter, b.count, "layer", b.expert_params)))
    return out


def _with(t: Tensor, **kw) -> Tensor:
    d = dict(t.__dict__)
    d.update(kw)
    return Tensor(**d)


def inventory(arch: Arch, params: ParamPlan, recipe: Recipe) -> list[Tensor]:
    """Every parameter tensor of the model as trained, marked trainable/quantized, with adapters."""
    method = recipe.method
    quantized = {(b.name, l.name) for b, l in params.quantized_linears}
    out: list[Tensor] = []
    base = _base_tensors(arch)

    if method == "full":
        return [_with(t, trainable=True) for _, _, t in base]

    if method == "freeze":
        k = min(recipe.freeze.trainable_layers, arch.layers)
        for b, l, t in base:
            if b.name == "layer":
                top = arch.top_layers(b, k)
                if top:
                    out.append(_with(t, count=top, trainable=True))
                if b.count - top:
                    out.append(_with(t, count=b.count - top))
            elif b.name == "final":
                out.append(_with(t, trainable=True))
            elif b.name == "head":
                out.append(_with(t, trainable=recipe.freeze.train_head))
            elif b.name == "embeddings" and arch.tie_embeddings and recipe.freeze.train_head and t.name.split(".")[1] in _EMBED_KEYS:
                out.append(_with(t, trainable=True))
            else:
                out.append(t)
        return out

    # lora / qlora: frozen base, adapters, trainable copies of modules_to_save
    save = modules_to_save(arch, recipe)
    for b, l, t in base:
        q = l is not None and t.name.endswith(".weight") and (b.name, l.name) in quantized
        out.append(_with(t, quantized=q))
        if l is not None and any(l.name.endswith(x) for x in save):  # PEFT's suffix match, as params.py
            out.append(_with(t, name=t.name + ".copy", role="copy", trainable=True))
    r = recipe.lora.r
    for b, l in params.lora_targets:
        unit = _unit(arch, b, l.short)
        out.append(Tensor(f"{b.name}.{l.name}.lora_A", r, l.in_features, b.count, unit, l.params, "adapter", True))
        out.append(Tensor(f"{b.name}.{l.name}.lora_B", l.out_features, r, b.count, unit, l.params, "adapter", True))
    return out


# ---------------------------------------------------------------------------------------------
# Bytes of pieces


def nf4_bytes(numel: int, double_quant: bool) -> tuple[int, int]:
    """(packed weight bytes, quant-state bytes) of one Linear4bit, exactly as bitsandbytes stores them."""
    packed = (numel + 1) // 2
    blocks = -(-numel // NF4_BLOCK)
    if double_quant:
        consts = blocks + DQ_OFFSET_BYTES + 4 * -(-blocks // DQ_BLOCK) + DQ_CODE_BYTES + NF4_CODE_BYTES
    else:
        consts = 4 * blocks + NF4_CODE_BYTES
    return packed, consts


def nf4_stored_numel(numel: int, storage_bytes: int) -> int:
    """Elements of a Params4bit whose packed bytes are stored as a `storage_bytes`-wide dtype
    (bnb_4bit_quant_storage): shape (packed / storage_bytes, 1)."""
    packed, _ = nf4_bytes(numel, False)
    return -(-packed // storage_bytes)


def bnb_state_bytes(numel: int, threshold_numel: int | None = None) -> tuple[int, bool]:
    """(bytes, is_8bit) of a bitsandbytes 8-bit Adam state for one tensor (qmaps not included)."""
    if (threshold_numel if threshold_numel is not None else numel) < BNB_MIN_8BIT_SIZE:
        return 8 * numel, False
    return 2 * numel + 2 * 4 * -(-numel // BNB_STATE_BLOCK), True


def buffer_bytes(arch: Arch) -> int:
    """Registered buffers transformers creates (rotary inv_freq, position ids, embed scale)."""
    if arch.buffers is not None:
        return arch.buffers
    if arch.model_type == "gpt2":
        return 0
    if arch.encoder:
        ids = arch.max_positions * 8  # position_ids, int64
        return ids * (2 if arch.model_type == "bert" else 1)  # bert also token_type_ids
    rot = 2 * (arch.head_dim // 2) * 4  # inv_freq and original_inv_freq, fp32
    return rot + (4 if arch.model_type == "gemma2" else 0)  # gemma2's embed_scale


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _shard(t: Tensor, n: int, strategy: str) -> int:
    """Elements of one tensor held by the most loaded rank."""
    if strategy == "fsdp":  # FSDP2 shards dim 0; rank 0 holds ceil(rows / n) rows
        return _ceil_div(t.rows, n) * t.cols
    return _ceil_div(t.numel, n)  # ZeRO-3 pads every parameter to a multiple of n


# ---------------------------------------------------------------------------------------------


class _Lines:
    def __init__(self) -> None:
        self.d: dict[str, int] = {}

    def add(self, name: str, value: int) -> int:
        value = int(value)
        if value:
            self.d[name] = self.d.get(name, 0) + value
        return value


def _dtype_name(nbytes: int, precision: str) -> str:
    return "fp32" if nbytes == 4 else ("fp16" if precision == "fp16" else "bf16")


def state_bytes(arch: Arch, params: ParamPlan, recipe: Recipe, strategy: str, world_size: int, gpus_per_node: int) -> StateBytes:
    """Model-state bytes per device (and host RAM per node under offload); see the module docstring."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy {strategy!r} must be resolved (ddp, zero1, zero2, zero3 or fsdp)")
    n = max(1, world_size)
    per_node = max(1, min(gpus_per_node, n))
    method, precision = recipe.method, recipe.train.precision
    cd = PRECISION_BYTES[precision]  # compute dtype bytes
    half = cd == 2
    ds = strategy in ("zero1", "zero2", "zero3")
    offload = recipe.parallel.offload if strategy != "ddp" else "none"
    if strategy in ("zero1", "zero2") and offload == "params":
        offload = "optimizer"  # only ZeRO-3 offloads parameters
    optim = recipe.train.optimizer
    dq = recipe.quantization.double_quant

    tensors = inventory(arch, params, recipe)
    w, g, o, tmp, host = _Lines(), _Lines(), _Lines(), _Lines(), _Lines()

    pure = precision == "bf16-pure"
    if pure and strategy not in PURE_BF16_STRATEGIES:
        raise ValueError(f"train.precision bf16-pure cannot run under {strategy} (fp32 master weights)")

    # --- dtype of each tensor as held on the device (before sharding) ---------------------------
    def held_bytes(t: Tensor) -> int:
        if pure:
            return 2
        if ds and half:
            return 2  # DeepSpeed casts the whole module (adapters included) to 16 bit
        if method == "full":
            return 4
        if t.role == "adapter":
            return 4
        if method == "freeze":
            return 4 if t.trainable else cd
        # lora / qlora (its non-4-bit part): base and modules_to_save copies in the compute dtype;
        # FSDP2 upcasts trainables
        return 4 if (strategy == "fsdp" and t.trainable) else cd

    def label(t: Tensor, nbytes: int) -> str:
        if t.role == "adapter":
            return "lora adapters"
        if t.role == "copy":
            return "modules_to_save copies"
        return f"base weights ({_dtype_name(nbytes, precision)})"

    trainable = [t for t in tensors if t.trainable]
    T = sum(t.count * t.numel for t in trainable)
    gather_b = 2 if half else None  # FSDP2/ZeRO-3 all-gather dtype under mixed precision

    # --- weights ---------------------------------------------------------------------------------
    sharded_params = strategy in ("zero3", "fsdp")
    persist_th = ds_persistence_threshold(arch)
    on_host_params = offload != "none" and sharded_params and (strategy == "fsdp" or offload == "params")
    for t in tensors:
        if t.quantized:
            packed, consts = nf4_bytes(t.numel, dq)
            # quantization constants (QuantState) are not parameters: whole on every rank
            w.add("quantization constants", t.count * consts)
            if not sharded_params:
                w.add("base weights (nf4)", t.count * packed)  # uint8 storage, replicated
                continue
            # ZeRO-3/FSDP: the trainer stores the packed bytes as the compute dtype
            # (bnb_4bit_quant_storage), a (packed / cd, 1) parameter that is sharded like any other
            e = nf4_stored_numel(t.numel, cd)
            local = t.count * _ceil_div(e, n) * cd
            (host if on_host_params else w).add(("host: param shard" if on_host_params else "base weights (nf4)"), local * (per_node if on_host_params else 1))
            if strategy == "zero3" and e <= persist_th:
                w.add("ZeRO-3 persistent params", t.count * e * cd)
            continue
        b = held_bytes(t)
        if sharded_params:
            local = t.count * _shard(t, n, strategy) * b
            (host if on_host_params else w).add(("host: param shard" if on_host_params else label(t, b)), local * (per_node if on_host_params else 1))
            if strategy == "zero3" and t.numel <= persist_th:
                w.add("ZeRO-3 persistent params", t.count * t.numel * b)
        else:
            w.add(label(t, b), t.count * t.numel * b)
    w.add("buffers", buffer_bytes(arch))

    gathered = 0
    # one process gathers too: ZeRO-3 frees param.data and re-allocates it to gather from ds_tensor,
    # FSDP2 all-gathers into a separate unsharded buffer (checked: a different data_ptr in the forward)
    if sharded_params:
        if strategy == "fsdp":
            units: dict[str, int] = {"embed": 0, "tail": 0, "root": 0}
            layer_parts: dict[str, int] = {}  # one decoder layer, each per-layer tensor once
            for t in tensors:
                # NF4 weights gather in their stored form (already the compute dtype: no cast)
                nb = nf4_stored_numel(t.numel, cd) * cd if t.quantized else t.numel * (gather_b or held_bytes(t))
                if t.unit == "layer":
                    layer_parts[t.name] = nb
                else:
                    units[t.unit] += t.count * nb
            layer = sum(layer_parts.values())
            # root stays gathered from forward to backward, the tail from its forward through its
            # backward; around them one unit is in use and the next one is prefetched
            gathered = units["root"] + max(units["embed"], units["tail"], layer) + layer
        else:
            gb = gather_b or 4

            def module_bytes(t: Tensor) -> int:  # a Linear4bit gathers its NF4 weight in the stored form
                if t.quantized:
                    return nf4_stored_numel(t.numel, cd) * cd + (t.module - t.numel) * gb
                return t.module * gb

            largest = max((module_bytes(t) for t in tensors), default=0)
            gathered = largest + gb * ds_prefetch_bucket(arch)  # one module plus the prefetch bucket
        w.add("gathered layers (in flight)", gathered)

    # --- gradients and optimizer -----------------------------------------------------------------
    def opt_lines(sizes: list[tuple[int, int, int, int]], target: _Lines, prefix: str = "") -> int:
        """sizes: (count, local numel, numel bnb compares with min_8bit_size, state dtype bytes).
        Adds the optimizer-state lines; returns the step temporaries (torch foreach)."""
        if optim == "sgd":  # momentum 0: no state; foreach weight decay is out of place
            return sum(c * loc * sb for c, loc, _, sb in sizes) if recipe.train.weight_decay > 0 else 0
        if optim == "adamw":
            temp = 0
            for c, loc, _, sb in sizes:
                target.add(prefix + "adam moments", 2 * c * loc * sb)
                temp += c * loc * sb  # exp_avg_sq.sqrt() of every tensor of a dtype group at once
            return temp if ADAMW_FOREACH else 0
        paged = optim == "paged_adamw_8bit"
        any8 = False
        for c, loc, thr, _ in sizes:
            nb, is8 = bnb_state_bytes(loc, thr)
            any8 |= is8
            name = "8-bit adam state" if is8 else "32-bit adam state (small tensors)"
            if paged and loc >= BNB_PAGED_MIN_NUMEL:
                name = "paged 8-bit adam state (unified memory)"
            target.add(prefix + name, c * nb)
        if any8:
            target.add(prefix + "8-bit adam state", BNB_QMAP_BYTES)
        return 0  # fused per-tensor kernels: no parameter-sized temporaries

    kept = _Lines()  # held from backward to the step (and across micro-batches)
    bw = _Lines()  # only during backward
    st = _Lines()  # only during the optimizer step (gradient copies)
    extra = 0  # step temporaries beyond kept + st
    if ds:
        gb = 2 if half else 4  # gradient / communication dtype
        if strategy == "zero3":
            part = sum(t.count * _shard(t, n, "zero3") for t in trainable)
        else:
            part = _ceil_div(T, n)
        sub = min(part, DS_SUB_GROUP_SIZE) if strategy == "zero3" else part
        groups = [(part // sub, sub, sub, 4)] + ([(1, part % sub, part % sub, 4)] if part % sub else []) if sub else []
        largest_grad = max((t.numel for t in trainable), default=0)
        bucket = ds_reduce_bucket(arch) * gb * (2 if DS_OVERLAP_COMM[strategy] and strategy != "zero3" else 1)
        (kept if strategy == "zero3" else bw).add("gradient reduce buckets", bucket)
        bw.add("unsharded gradients (in flight)", largest_grad * gb)
        if offload != "none":
            # DeepSpeed's CPU Adam: fp32 master, moments and gradient partition on the host (pinned)
            host.add("host: fp32 master weights", 4 * part * per_node)
            opt_lines([(c * per_node, loc, thr, sb) for c, loc, thr, sb in groups], host, "host: ")
            host.add("host: fp32 gradient partition", 4 * part * per_node)
            if strategy != "zero3":
                host.add("host: 16-bit param buffer", gb * part * per_node)
        else:
            o.add("fp32 master weights", 4 * part)
            foreach = opt_lines(groups, o)
            kept.add(f"gradient partition ({_dtype_name(gb, precision)})", gb * part)
            st.add("fp32 gradient partition (step)", 4 * sub)
            if strategy == "zero3":
                extra = 4 * sub if foreach else 0  # sub-groups step one after another
            else:
                # the 16-bit partition is flattened (a copy) and cast to fp32 (in fp32 the flat copy
                # is the fp32 gradient), then freed before the inner optimizer runs
                conversion = gb * part + gb * part + (4 * part if gb != 4 else 0)
                adam = 4 * part + foreach
                extra = max(conversion, adam) - (gb * part + 4 * part)
    elif strategy == "fsdp":
        rb = 2 if half else 4  # reduce dtype
        local = [(t.count, _shard(t, n, "fsdp"), t.numel, held_bytes(t)) for t in trainable]
        grad_shard = sum(c * loc * b for c, loc, _, b in local)
        per_unit: dict[str, int] = {}
        seen: set[str] = set()
        for t in trainable:
            if t.name not in seen:
                seen.add(t.name)
                per_unit[t.unit] = per_unit.get(t.unit, 0) + t.numel * (1 if t.unit == "layer" else t.count)
        if n > 1:  # one unit's unsharded gradients plus the reduce-scatter input, during its backward
            bw.add("unsharded gradients (in flight)", 2 * rb * max(per_unit.values(), default=0))
        if offload != "none":
            host.add("host: gradient shard", grad_shard * per_node)
            opt_lines([(c * per_node, loc, thr, b) for c, loc, thr, b in local], host, "host: ")
        else:
            kept.add("gradients", grad_shard)
            extra = opt_lines(local, o)
    else:  # ddp (and a single process)
        local = [(t.count, t.numel, t.numel, held_bytes(t)) for t in trainable]
        grads = sum(c * loc * b for c, loc, _, b in local)
        kept.add("gradients", grads)
        if n > 1 and not DDP_GRADIENT_AS_BUCKET_VIEW:
            kept.add("ddp gradient buckets", grads)
        extra = opt_lines(local, o)

    # gradients = what is kept plus the larger of the backward-only and step-only parts; the step
    # temporaries are what the step needs beyond that
    bw_t, st_t = sum(bw.d.values()), sum(st.d.values())
    g.d.update(kept.d)
    g.d.update(bw.d if bw_t > st_t else st.d)
    kept_b = sum(kept.d.values())
    tmp.add("optimizer step temporaries", max(0, kept_b + st_t + extra - (kept_b + max(bw_t, st_t))))

    detail = {**w.d, **g.d, **o.d, **tmp.d, **host.d}
    gathered_b = w.d.get("gathered layers (in flight)", 0)
    return StateBytes(
        weights=sum(w.d.values()),
        gathered=gathered_b,
        gradients=sum(g.d.values()),
        optimizer=sum(o.d.values()),
        step_temp=sum(tmp.d.values()),
        cpu=sum(host.d.values()),
        detail=detail,
        gradients_kept=kept_b,
        phases={"kept": dict(kept.d), "backward": dict(bw.d), "step": dict(st.d)},
    )
