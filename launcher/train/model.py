"""Model and tokenizer for method × task, built the way the estimator assumes (docs/estimation-states.md).

| method | base weights | trains |
|---|---|---|
| full | fp32 (bf16/fp16 is autocast, Trainer `bf16=True`) | everything |
| freeze | compute dtype; the trained modules upcast to fp32 | last k blocks + final norm + head |
| lora | compute dtype (bf16, or fp32 when precision fp32) | fp32 adapters (PEFT autocast_adapter_dtype) |
| qlora | NF4 linears (bitsandbytes, double quant, compute dtype); the rest in the compute dtype, as lora | fp32 adapters |

With `train.precision: bf16-pure` everything is bf16 and nothing is autocast: the weights of every method, the
trained ones and the LoRA adapters included (so their gradients and AdamW moments are bf16 too).

QLoRA is LoRA's model with the linears in NF4: after PEFT's `prepare_model_for_kbit_training` (which freezes
everything and enables gradient checkpointing) the embeddings, norms, head and biases it upcast to fp32 go back to
the compute dtype (`prepare_kbit`); fp32 copies of them cost ~2 GB on an 8B model (plus an fp32 residual stream and
a 16-bit copy of the head under autocast), and frozen they train fine in bf16, as in plain LoRA.

LoRA targets are the explicit list `peft_target_modules(plan_params(arch, recipe))`, never PEFT's
own 'all-linear', and classification keeps the classifier head trainable (`modules_to_save`).

A local model folder with config.json but no weights gets random weights from `from_config`
(seeded by train.seed). They are written once to RUN_DIR/init (by the main process) and every rank,
the DPO reference model, `ftl merge` and `ftl generate` load that same folder.
"""

from __future__ import annotations

import logging
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from launcher.core.errors import FtlError
from launcher.estimate.arch import SUPPORTED, ArchError, arch_from_config
from launcher.estimate.probed import arch_from_inventory
from launcher.estimate.params import modules_to_save, peft_target_modules, plan_params
from launcher.spec.recipe import Recipe
from launcher.train.adapters import lora_model
from launcher.train.probe import inventory_of
from launcher.train.source import ModelSource, has_weights

log = logging.getLogger("ftl.train")

DTYPES = {"bf16": torch.bfloat16, "bf16-pure": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
FINAL_NAMES = ("norm", "ln_f", "final_layernorm", "final_layer_norm", "pooler", "pre_classifier")
HEAD_NAMES = ("lm_head", "score", "classifier")


def pure_bf16(recipe: Recipe) -> bool:
    return recipe.train.precision == "bf16-pure"


def trl_casts_trainables(recipe: Recipe) -> bool:
    """True where TRL casts the trainable parameters to bf16 on its own (a 4-bit model, or LoRA under bf16-pure,
    whose bf16 base it reads as such) and the trainer must put them back with `cast_trainable`."""
    return recipe.method == "qlora" or (recipe.method == "lora" and pure_bf16(recipe))


def trained_dtype(recipe: Recipe) -> torch.dtype:
    """dtype of the parameters that train: fp32 masters, or bf16 under bf16-pure."""
    return torch.bfloat16 if pure_bf16(recipe) else torch.float32


def compute_dtype(recipe: Recipe) -> torch.dtype:
    """dtype of the frozen base weights (and of the trained ones for full: fp32, bf16 under bf16-pure)."""
    if recipe.method == "full":
        return trained_dtype(recipe)
    if recipe.method == "qlora":
        return qlora_compute_dtype(recipe)
    return DTYPES[recipe.train.precision]


def qlora_compute_dtype(recipe: Recipe) -> torch.dtype:
    """quantization.compute_dtype, except that precision fp32 means fp32 throughout (as the estimate assumes)."""
    return torch.float32 if recipe.train.precision == "fp32" else DTYPES[recipe.quantization.compute_dtype]


def model_class(recipe: Recipe):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    return AutoModelForSequenceClassification if recipe.head == "seq_cls" else AutoModelForCausalLM


def config_kwargs(recipe: Recipe, tokenizer) -> dict[str, Any]:
    kw: dict[str, Any] = {}
    if recipe.task == "reward":
        kw.update(num_labels=1)  # one score per sequence (TRL's RewardTrainer requires it)
    elif recipe.task == "classification":
        label_map = recipe.data.label_map or {str(i): i for i in range(recipe.num_labels)}
        kw.update(num_labels=recipe.num_labels, label2id=dict(label_map), id2label={int(v): k for k, v in label_map.items()})
    return kw


def load_config(src: ModelSource, recipe: Recipe, tokenizer):
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(src.path, **config_kwargs(recipe, tokenizer))
    if getattr(cfg, "pad_token_id", None) is None and tokenizer is not None:
        cfg.pad_token_id = tokenizer.pad_token_id
    return cfg


@contextmanager
def _without_zero3_init():
    """Build a model on one process only: ZeRO-3's zero.Init would partition it collectively (and hang)."""
    import transformers.integrations.deepspeed as hfds

    ref = hfds._hf_deepspeed_config_weak_ref
    hfds.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hfds._hf_deepspeed_config_weak_ref = ref


def materialize_random_init(src: ModelSource, recipe: Recipe, tokenizer, run_dir: Path, state) -> str:
    """The folder to load from: the model itself, or RUN_DIR/init with seeded random weights."""
    if src.has_weights:
        return src.path
    init = run_dir / "init"
    if state.is_main_process and not has_weights(init):
        from transformers import set_seed

        log.warning("model folder %s has config.json but no weights: training from RANDOM weights (from_config, "
                    "seed %d), saved to %s", src.path, recipe.train.seed, init)
        cfg = load_config(src, recipe, tokenizer)
        set_seed(recipe.train.seed)
        with _without_zero3_init():
            model = model_class(recipe).from_config(cfg, dtype=torch.float32)
        tmp = run_dir / "init.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        shutil.rmtree(init, ignore_errors=True)
        os.replace(tmp, init)
        del model
    state.wait_for_everyone()
    if not has_weights(init):
        raise FtlError(f"{init}: random initial weights were not written (is RUN_DIR shared by all processes?)")
    return str(init)


def _attn(recipe: Recipe, device: str) -> str:
    attn = recipe.train.attn_implementation
    if attn == "flash_attention_2" and device != "cuda":
        log.warning("train.attn_implementation flash_attention_2 needs a CUDA GPU; using sdpa on the %s", device)
        return "sdpa"
    return attn


def bnb_config(recipe: Recipe, head_names: list[str], sharded: bool):
    from transformers import BitsAndBytesConfig

    q = recipe.quantization
    cd = qlora_compute_dtype(recipe)
    extra: dict[str, Any] = {}
    if sharded:  # ZeRO-3 / FSDP flatten every parameter into one dtype: store the packed NF4 bytes as cd
        extra["bnb_4bit_quant_storage"] = cd
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=q.quant_type,
        bnb_4bit_use_double_quant=q.double_quant,
        bnb_4bit_compute_dtype=cd,
        llm_int8_skip_modules=list(dict.fromkeys(list(q.skip_modules) + head_names)),  # the head always stays
        **extra,
    )


def load_base(recipe: Recipe, path: str, tokenizer, *, device: str, strategy: str, local_rank: int = 0):
    """The base model from `path` in the dtype the method asks for (no adapters yet)."""
    cls = model_class(recipe)
    kwargs: dict[str, Any] = dict(dtype=compute_dtype(recipe), attn_implementation=_attn(recipe, device))
    kwargs.update(config_kwargs(recipe, tokenizer))
    if recipe.method == "qlora":
        kwargs["quantization_config"] = bnb_config(recipe, list(HEAD_NAMES), strategy in ("zero3", "fsdp"))
        if strategy == "zero3":
            pass  # DeepSpeed ZeRO-3 refuses a device_map; bitsandbytes quantizes on the host all the same
        elif device == "cpu":
            kwargs["device_map"] = {"": "cpu"}
        elif strategy != "fsdp":
            kwargs["device_map"] = {"": local_rank}
    try:
        model = cls.from_pretrained(path, **kwargs)
    except ValueError as e:
        if "attn" not in str(e).lower() and "attention" not in str(e).lower():
            raise
        log.warning("%s; falling back to eager attention", str(e).splitlines()[0][:200])
        kwargs["attn_implementation"] = "eager"
        model = cls.from_pretrained(path, **kwargs)
    if tokenizer is not None:
        if model.config.pad_token_id is None:
            model.config.pad_token_id = tokenizer.pad_token_id
        emb = model.get_input_embeddings()
        if emb is not None and len(tokenizer) > emb.num_embeddings:
            if recipe.method == "qlora":
                raise FtlError(f"the tokenizer has {len(tokenizer)} tokens but the model only {emb.num_embeddings} "
                               "embeddings; resizing a 4-bit model is not supported")
            log.warning("resizing the embeddings from %d to the tokenizer's %d tokens", emb.num_embeddings, len(tokenizer))
            model.resize_token_embeddings(len(tokenizer))
    model.config.use_cache = False  # no KV cache while training
    return model


# ---------------------------------------------------------------------------------------------
# freeze


def find_blocks(model) -> tuple[str, torch.nn.ModuleList]:
    """The ModuleList of transformer blocks (the longest one)."""
    best: tuple[str, torch.nn.ModuleList] | None = None
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.ModuleList) and len(mod) and (best is None or len(mod) > len(best[1])):
            best = (name, mod)
    if best is None:
        raise FtlError(f"{type(model).__name__}: no list of transformer blocks found for method 'freeze'")
    return best


def freeze_modules(model, recipe: Recipe) -> list[tuple[str, torch.nn.Module]]:
    """(name, module) of what method 'freeze' trains: last k blocks, final norm (or pooler/pre-classifier), head."""
    prefix, blocks = find_blocks(model)
    k = min(recipe.freeze.trainable_layers, len(blocks))
    out = [(f"{prefix}.{i}", blocks[i]) for i in range(len(blocks) - k, len(blocks))]
    for name, mod in model.named_modules():
        short = name.rsplit(".", 1)[-1]
        if name.startswith(prefix + ".") or name == prefix:
            continue
        if short in FINAL_NAMES:
            out.append((name, mod))
    if recipe.freeze.train_head:
        heads = [(n, m) for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in ("score", "classifier")]
        if recipe.head != "seq_cls" or not heads:
            head = model.get_output_embeddings()
            heads = [(n, m) for n, m in model.named_modules() if m is head] if head is not None else []
        out += heads
    return out


def apply_freeze(model, recipe: Recipe) -> list[str]:
    for p in model.parameters():
        p.requires_grad_(False)
    names = []
    want = trained_dtype(recipe)
    for name, mod in freeze_modules(model, recipe):
        names.append(name)
        for p in mod.parameters():
            if p.is_floating_point() and p.dtype != want:
                p.data = p.data.to(want)  # trained weights are fp32 masters (autocast casts per op), or bf16-pure
            p.requires_grad_(True)
    return names


# ---------------------------------------------------------------------------------------------
# LoRA


def lora_config(model, recipe: Recipe):
    from peft import LoraConfig

    head = recipe.head
    try:
        cfg = model.config.to_dict()
        if cfg.get("model_type") in SUPPORTED:
            arch = arch_from_config(cfg, head, recipe.num_labels)  # type: ignore[arg-type]
        else:  # the same module tree the estimator probed: the same target list
            arch = arch_from_inventory({"inventory": inventory_of(model, model.config)}, cfg, head, recipe.num_labels)  # type: ignore[arg-type]
        params = plan_params(arch, recipe)
        targets: Any = peft_target_modules(params)
        save = modules_to_save(arch, recipe)
    except (ArchError, KeyError) as e:
        targets = recipe.lora.target_modules
        save = list(recipe.lora.modules_to_save) + (["classifier", "score"] if recipe.head == "seq_cls" else [])
        log.warning("the estimator does not know this architecture (%s); passing target_modules=%r to PEFT as is", e, targets)
    present = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    save = [s for s in save if s.rsplit(".", 1)[-1] in present] or None
    if not targets:
        raise FtlError(f"lora.target_modules = {recipe.lora.target_modules!r}: matches no linear module of this model")
    return LoraConfig(
        r=recipe.lora.r,
        lora_alpha=recipe.lora.alpha,
        lora_dropout=recipe.lora.dropout,
        target_modules=targets,
        modules_to_save=save,
        bias="none",
        task_type="SEQ_CLS" if recipe.head == "seq_cls" else "CAUSAL_LM",
    )


def prepare_for_method(model, recipe: Recipe):
    """Apply freeze / prepare a 4-bit model; returns (model, LoraConfig or None). Adapters are not attached here."""
    if recipe.method == "freeze":
        names = apply_freeze(model, recipe)
        log.info("freeze: training %s", ", ".join(names))
        return model, None
    if recipe.method == "full":
        return model, None
    if recipe.method == "qlora":
        model = prepare_kbit(model, recipe.train.gradient_checkpointing)
    return model, lora_config(model, recipe)


def prepare_kbit(model, gradient_checkpointing: bool):
    """PEFT's `prepare_model_for_kbit_training`, without its fp32 upcast: QLoRA = LoRA's model with NF4 linears.

    PEFT freezes every parameter, enables gradient checkpointing (non-reentrant here, so no input-require-grads hook
    is needed) and upcasts every non-4-bit bf16/fp16 parameter (embeddings, norms, lm_head, biases) to fp32; each
    upcast parameter goes back to the dtype it was loaded in (the compute dtype), because the fp32 copies cost ~2 GB
    on an 8B model while the frozen norms/embeddings train fine in bf16, as in plain LoRA. Buffers are not touched
    by PEFT (the rotary tables stay fp32 as in LoRA); with compute dtype fp32 nothing changes. The LoRA adapters,
    attached later, stay fp32.
    """
    from peft import prepare_model_for_kbit_training

    loaded = {id(p): p.dtype for p in model.parameters()}
    model = prepare_model_for_kbit_training(
        model,
        use_gradient_checkpointing=gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
    )
    for p in model.parameters():
        dtype = loaded.get(id(p))
        if dtype is not None and p.dtype != dtype and p.is_floating_point() and not p.requires_grad:
            p.data = p.data.to(dtype)
    return model


def attach_adapters(model, peft_config, recipe: Recipe):
    # adapters in fp32 (autocast_adapter_dtype=True), or in the base's bf16 under bf16-pure; the target
    # list as given (launcher/train/adapters.py)
    return lora_model(model, peft_config, adapter_fp32=not pure_bf16(recipe))


def cast_trainable(model, adapter_dtype: torch.dtype = torch.float32) -> int:
    """Trainable parameters back to the dtype LoRA trains them in (TRL casts a 4-bit model's trainables to bf16):
    adapters fp32 (bf16 under bf16-pure), modules_to_save copies the dtype of the module they copy (PEFT's copy,
    as with lora). Returns how many elements changed dtype."""
    want: dict[int, torch.dtype] = {}
    for m in model.modules():
        orig, copies = getattr(m, "original_module", None), getattr(m, "modules_to_save", None)
        if isinstance(orig, torch.nn.Module) and isinstance(copies, torch.nn.ModuleDict):
            base = dict(orig.named_parameters())
            for copy in copies.values():
                for name, p in copy.named_parameters():
                    if name in base:
                        want[id(p)] = base[name].dtype
    n = 0
    for p in model.parameters():
        dtype = want.get(id(p), adapter_dtype)
        if p.requires_grad and p.is_floating_point() and p.dtype != dtype:
            p.data = p.data.to(dtype)
            n += p.numel()
    return n


def count_params(model) -> dict[str, int]:
    total = trainable = 0
    for p in model.parameters():
        qs = getattr(p, "quant_state", None)  # bitsandbytes Params4bit: numel() counts packed bytes
        n = p.ds_numel if hasattr(p, "ds_numel") else int(torch.Size(qs.shape).numel()) if qs is not None else p.numel()
        total += n
        trainable += n if p.requires_grad else 0
    return {"total": total, "trainable": trainable}
