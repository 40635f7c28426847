"""Which parameters train, which are adapters, which are quantized: the counts every later figure uses.

Mirrors what `launcher.train` asks of PEFT and bitsandbytes, so counts match what they build
(tests compare with PEFT's own count and with bitsandbytes' stored tensors).
"""

from __future__ import annotations

from dataclasses import dataclass

from launcher.core.errors import FtlError
from launcher.estimate.arch import Arch, Block, Linear
from launcher.spec.recipe import Recipe

# Module names PEFT adds to modules_to_save for sequence classification (its SEQ_CLS task type).
CLASSIFIER_NAMES = ("classifier", "score")


@dataclass(frozen=True)
class ParamPlan:
    """Parameter counts of the model as trained (per model replica, before any sharding)."""

    total: int  # base model parameters (tied weights once)
    active: int  # per token (MoE: routed experts only)
    trainable: int  # what the optimizer updates (adapters, modules_to_save copies, or base weights)
    adapter: int  # LoRA A and B matrices
    saved_copies: int  # modules_to_save: PEFT keeps a trainable copy beside the frozen original
    trainable_base: int  # base-model weights updated in place (full, freeze)
    frozen: int  # base-model weights that do not train
    quantized_weights: int  # elements stored in 4/8 bit (0 without quantization)
    quantized_linears: tuple[tuple[Block, Linear], ...]
    lora_targets: tuple[tuple[Block, Linear], ...]
    # Index of the lowest transformer layer with trainable weights (layers below it need no
    # input gradients); `layers` when only the head trains, 0 when the embeddings train.
    lowest_trainable_layer: int
    embeddings_train: bool


ROUTER_NAMES = ("gate", "router")
# PEFT 0.18 refuses LoRA on these modules of state-space models (peft/tuners/tuners_utils.py,
# _check_lora_target_modules_mamba): all-linear leaves them out, a named one is an error
PEFT_MAMBA_TYPES = {"falcon_h1", "mamba", "mamba2", "falcon_mamba", "nemotron_h"}
PEFT_MAMBA_REFUSED = {"out_proj", "conv1d"}


def is_router(arch: Arch, linear: Linear) -> bool:
    """An MoE router as a Linear (probed architectures): PEFT's all-linear would adapt it, ftl does not."""
    return bool(arch.num_experts) and linear.short in ROUTER_NAMES and linear.out_features == arch.num_experts


def _is_target(linear: Linear, targets: list[str] | str, arch: Arch, block: Block) -> bool:
    if block.name == "head":
        return False  # PEFT's all-linear never adapts the output layer; named targets are matched below
    if arch.model_type in PEFT_MAMBA_TYPES and linear.short in PEFT_MAMBA_REFUSED:
        return False
    if targets == "all-linear":
        return not is_router(arch, linear)
    return linear.short in targets or linear.name in targets


def lora_targets(arch: Arch, targets: list[str] | str) -> tuple[tuple[Block, Linear], ...]:
    """The Linear modules LoRA adapts; a named target that is no Linear module of the model is an error."""
    if targets != "all-linear":
        real = {n for _, l in arch.linears() for n in (l.short, l.name)}
        absent = [t for t in targets if t not in real]
        refused = [t for t in targets if arch.model_type in PEFT_MAMBA_TYPES and t in PEFT_MAMBA_REFUSED]
        if refused:
            raise FtlError(f"lora.target_modules: PEFT does not adapt {', '.join(map(repr, refused))} of "
                           f"{arch.model_type} models; leave {'it' if len(refused) == 1 else 'them'} out (or use 'all-linear')")
        if absent:
            raise FtlError(
                f"lora.target_modules: {', '.join(map(repr, absent))} {'is' if len(absent) == 1 else 'are'} not a Linear "
                f"module of {arch.model_type}; its Linear modules: {', '.join(target_names(arch))} (or 'all-linear')")
    found = tuple((b, l) for b, l in arch.linears() if _is_target(l, targets, arch, b))
    if targets != "all-linear":
        # an explicitly named head is adapted too (PEFT matches by name)
        found += tuple((b, l) for b, l in arch.linears() if b.name == "head" and l.short in targets)
    return found


def target_names(arch: Arch) -> list[str]:
    """Short names of the linears LoRA can target in this architecture."""
    names: list[str] = []
    for _, l in arch.linears():
        if l.short not in names:
            names.append(l.short)
    return names


def modules_to_save(arch: Arch, recipe: Recipe) -> list[str]:
    names = list(recipe.lora.modules_to_save)
    if recipe.head == "seq_cls":
        names += [n for n in CLASSIFIER_NAMES if n not in names]
    return names


def quantized_linears(arch: Arch, recipe: Recipe) -> tuple[tuple[Block, Linear], ...]:
    """bitsandbytes through transformers converts every Linear but the output head and skipped modules."""
    if recipe.method != "qlora":
        return ()
    skip = set(recipe.quantization.skip_modules)
    return tuple(
        (b, l)
        for b, l in arch.linears()
        if b.name != "head" and l.short not in skip and l.name not in skip
    )


def plan_params(arch: Arch, recipe: Recipe) -> ParamPlan:
    total = arch.params_total
    method = recipe.method
    adapter = saved = trainable_base = 0
    targets: tuple[tuple[Block, Linear], ...] = ()
    embeddings_train = False
    lowest = arch.layers

    if method == "full":
        trainable_base = total
        embeddings_train = True
        lowest = 0
    elif method == "freeze":
        k = min(recipe.freeze.trainable_layers, arch.layers)
        head = arch.block("head")
        trainable_base = sum(arch.top_layers(b, k) * b.params for b in arch.layer_blocks) + arch.block("final").params
        if recipe.freeze.train_head:
            if arch.tie_embeddings:  # the head is the embedding matrix
                trainable_base += arch.block("embeddings").other.get("embed_tokens", arch.block("embeddings").other.get("wte", 0))
                embeddings_train = True
            else:
                trainable_base += head.params
        lowest = 0 if embeddings_train else arch.layers - k
    else:  # lora, qlora
        save = modules_to_save(arch, recipe)
        # a module trained in full is not also adapted (PEFT refuses both on one module); ftl's
        # trainer passes PEFT this exact target list, so 'all-linear' means the same in both
        targets = tuple((b, l) for b, l in lora_targets(arch, recipe.lora.target_modules)
                        if not any(l.name.endswith(n) for n in save))
        r = recipe.lora.r
        adapter = sum(b.count * r * (l.in_features + l.out_features) for b, l in targets)
        layer_targets = [l for b, l in targets if b.name == "layer"]
        if layer_targets:
            lowest = 0
        for b, l in arch.linears():
            # PEFT matches modules_to_save by a plain suffix: 'classifier' also catches 'pre_classifier'
            if any(l.name.endswith(n) for n in save):
                saved += b.count * l.params
        if any(b.name == "head" for b, _ in targets) or saved:
            lowest = min(lowest, arch.layers)

    trainable = trainable_base + adapter + saved
    q = quantized_linears(arch, recipe)
    quantized = sum(b.count * l.weight_params for b, l in q)
    return ParamPlan(
        total=total,
        active=arch.params_active,
        trainable=trainable,
        adapter=adapter,
        saved_copies=saved,
        trainable_base=trainable_base,
        frozen=total - trainable_base,
        quantized_weights=quantized,
        quantized_linears=q,
        lora_targets=targets,
        lowest_trainable_layer=lowest,
        embeddings_train=embeddings_train,
    )


def peft_target_modules(params: ParamPlan) -> list[str]:
    """The explicit target list the trainer gives PEFT, so that PEFT adapts exactly what was estimated.

    PEFT's own 'all-linear' also wraps MoE routers and fused experts and clashes with modules_to_save;
    expanding it here keeps the estimate and the run in step.
    """
    names: list[str] = []
    for _, lin in params.lora_targets:
        if lin.name not in names:
            names.append(lin.name)
    return names
