"""One training step of a tiny Llama in a real multi-process world; each rank reports what it holds.

Launched by tests/test_sharding.py through `accelerate launch` (2 processes, gloo, CPU). Each rank
writes `<out>/rank<R>.json` with the bytes of its local parameter shard, gradient shard, optimizer
state, DeepSpeed fp32 master partition and DeepSpeed's gradient buffers, measured at the points
where they are all alive (the entry of the inner optimizer's step), plus every tensor storage the
process holds at each phase attributed to the object that owns it (for debugging).

Launch lines that really give a 2-process world on the CPU (Accelerate 1.15):
  DeepSpeed: `accelerate launch --config_file ds.yaml dist_probe.py ...` with
             InitProcessGroupKwargs(backend="gloo") and no cpu flag (cpu=True silently falls back to DDP).
  FSDP2:     `accelerate launch --config_file fsdp2.yaml dist_probe.py ...` with Accelerator(cpu=True)
             and the state patch below (Accelerate never switches a CPU world to FSDP by itself).
  DDP:       `ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 dist_probe.py ...`.
The script asserts world size 2 and the distributed type inside the process: every wrong variant
of these lines exits 0 with a silent single-process or DDP run.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import sys
from collections import defaultdict

import torch
import torch.distributed as dist

# the same measuring code ftl's trainer uses for shards/rank-<k>.json
from launcher.train.shards import _local, _storage, elem_bytes, inner_optimizer, nbytes, optimizer_state_bytes


def parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser()
    ap.add_argument("--strategy", choices=["ddp", "zero1", "zero2", "zero3", "fsdp"], required=True)
    ap.add_argument("--method", choices=["full", "lora", "qlora"], default="full")
    ap.add_argument("--model-dir", required=True, help="folder with the tiny model's config.json")
    ap.add_argument("--lora-r", type=int, default=8)
    ap.add_argument("--lora-targets", default="q_proj,v_proj")
    ap.add_argument("--out", required=True)
    ap.add_argument("--pure-bf16", action="store_true", help="train.precision bf16-pure: bf16 weights (adapters too), no autocast")
    ap.add_argument("--seq", type=int, default=16)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--local_rank", type=int, default=-1)
    return ap.parse_args()


def make_accelerator(strategy: str):
    from accelerate import Accelerator
    from accelerate.utils import DistributedType, InitProcessGroupKwargs

    if strategy == "fsdp":
        from accelerate import FullyShardedDataParallelPlugin
        from accelerate.state import PartialState

        plugin = FullyShardedDataParallelPlugin()  # reads the FSDP_* env set by `accelerate launch`
        acc = Accelerator(cpu=True, fsdp_plugin=plugin)
        acc.state.distributed_type = DistributedType.FSDP
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP
        acc.state.fsdp_plugin = plugin
        if acc.mixed_precision != "no":  # Accelerate skips this on the CPU: bf16 would be silently ignored
            plugin.set_mixed_precision(acc.mixed_precision)
        want = DistributedType.FSDP
    elif strategy == "ddp":
        acc = Accelerator(cpu=True)
        want = DistributedType.MULTI_CPU
    else:
        acc = Accelerator(kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")])
        want = DistributedType.DEEPSPEED
    assert acc.num_processes == 2, f"world size {acc.num_processes}, not 2 ({acc.distributed_type})"
    assert dist.is_initialized() and dist.get_world_size() == 2, "torch.distributed world is not 2"
    assert acc.distributed_type == want, f"distributed_type {acc.distributed_type}, wanted {want}"
    return acc


# --------------------------------------------------------------------------------------------
# What a process holds


def live_storages() -> dict[int, tuple[int, str, tuple]]:
    """Every tensor storage reachable from Python objects (gc), deduplicated."""
    seen: dict[int, tuple[int, str, tuple]] = {}
    for o in gc.get_objects():
        try:
            if torch.is_tensor(o):
                s = _storage(o)
                if s is not None:
                    seen[s.data_ptr()] = (s.nbytes(), str(o.dtype), tuple(o.shape))
        except Exception:  # noqa: BLE001 - some tensor subclasses refuse storage access
            pass
    return seen


def attribute(roots: dict, max_depth: int = 7) -> dict[int, tuple[int, str, str]]:
    """storage ptr -> (bytes, first attribute path that reaches it, dtype), walking object attributes."""
    found: dict[int, tuple[int, str, str]] = {}
    seen: set[int] = set()
    queue = [(v, k, 0) for k, v in roots.items()]
    mods = ("deepspeed", "torch", "accelerate", "bitsandbytes", "peft", "transformers")
    while queue:
        obj, path, depth = queue.pop(0)
        if obj is None or id(obj) in seen or depth > max_depth:
            continue
        seen.add(id(obj))
        if torch.is_tensor(obj):
            try:
                s = _storage(obj)
            except Exception:  # noqa: BLE001
                s = None
            if s is not None and s.data_ptr() not in found:
                found[s.data_ptr()] = (s.nbytes(), path, str(obj.dtype))
            for k, v in getattr(obj, "__dict__", {}).items():
                queue.append((v, f"{path}.{k}", depth + 1))
            if isinstance(obj, torch.nn.Parameter) and obj.grad is not None:
                queue.append((obj.grad, f"{path}.grad", depth + 1))
            continue
        if isinstance(obj, torch.nn.Module):
            for n, p in obj.named_parameters(recurse=False):
                queue.append((p, f"{path}.{n}", depth + 1))
            for n, b in obj.named_buffers(recurse=False):
                queue.append((b, f"{path}.{n}", depth + 1))
            for n, c in obj.named_children():
                queue.append((c, f"{path}.{n}", depth))
            for k, v in vars(obj).items():
                if k not in ("_parameters", "_buffers", "_modules") and not isinstance(v, torch.nn.Module):
                    queue.append((v, f"{path}.{k}", depth + 1))
            continue
        if isinstance(obj, (list, tuple, set)):
            for v in obj:
                queue.append((v, f"{path}[]", depth + 1))
        elif isinstance(obj, dict):
            for k, v in obj.items():
                queue.append((v, f"{path}[{k if isinstance(k, (str, int)) else type(k).__name__}]", depth + 1))
                if torch.is_tensor(k):
                    queue.append((k, f"{path}<key>", depth + 1))
        elif hasattr(obj, "__dict__") and not isinstance(obj, type) and type(obj).__module__.split(".")[0] in mods:
            for k, v in vars(obj).items():
                queue.append((v, f"{path}.{k}", depth + 1))
    return found


def summarize(found: dict[int, tuple[int, str, str]], depth: int = 2) -> dict[str, list]:
    agg: dict[str, list] = defaultdict(lambda: [0, set()])
    for nbytes, path, dtype in found.values():
        key = ".".join(re.sub(r"\[[^\]]*\]", "[]", path).split(".")[:depth])
        agg[key][0] += nbytes
        agg[key][1].add(dtype)
    return {k: [v[0], sorted(v[1])] for k, v in sorted(agg.items())}


def snapshot(roots: dict) -> dict:
    live = live_storages()
    found = attribute(roots)
    other = [list(v) for p, v in live.items() if p not in found]
    return {
        "live_bytes": sum(v[0] for v in live.values()),
        "by_owner": summarize(found),
        "unowned": sorted(other, key=lambda v: -v[0])[:10],
    }


# --------------------------------------------------------------------------------------------
# QLoRA as ftl's trainer builds it under ZeRO-3/FSDP (launcher/train/model.py: bnb_config, prepare_kbit)


def load_qlora(model, args, acc, cd: torch.dtype):
    """The random weights saved by rank 0 (save_pretrained writes on the main process only) and loaded
    back on every rank in NF4 (double quant) with the packed 4-bit bytes stored as the compute dtype
    (bnb_4bit_quant_storage), the head left unquantized."""
    from transformers import BitsAndBytesConfig, LlamaForCausalLM

    from launcher.train.model import prepare_kbit

    src = os.path.join(args.out, "base")
    if acc.is_main_process:
        model.save_pretrained(src)
    acc.wait_for_everyone()
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=cd, bnb_4bit_quant_storage=cd, llm_int8_skip_modules=["lm_head"])
    # transformers refuses a device_map under ZeRO-3 ("DeepSpeed Zero-3 is not compatible with passing a
    # `device_map`"); without one it loads onto the CPU anyway
    dm = None if args.strategy == "zero3" else {"": "cpu"}
    model = LlamaForCausalLM.from_pretrained(src, quantization_config=q, dtype=cd, device_map=dm)
    return prepare_kbit(model, False)


def quant_view(model) -> dict:
    """Every bitsandbytes Linear4bit: local bytes of its weight (the packed NF4 in its storage dtype, as
    sharded) and the bytes of its quantization constants (QuantState tensors, wherever they hang)."""
    out = {"modules": 0, "weight_local_bytes": 0, "weight_full_bytes": 0, "weight_dtypes": set(),
           "weight_types": set(), "const_bytes": 0}
    consts = []
    import bitsandbytes as bnb

    for m in model.modules():
        if not isinstance(m, bnb.nn.Linear4bit):  # not PEFT's lora.Linear4bit wrapper (same weight)
            continue
        out["modules"] += 1
        w = m.weight
        t = w.ds_tensor if hasattr(w, "ds_tensor") else _local(w)
        out["weight_local_bytes"] += t.numel() * t.element_size()
        full = w.ds_numel if hasattr(w, "ds_numel") else w.numel()
        out["weight_full_bytes"] += full * t.element_size()
        out["weight_dtypes"].add(str(t.dtype))
        out["weight_types"].add(type(w).__name__)
        qs = getattr(w, "quant_state", None) or getattr(m, "quant_state", None)
        if qs is not None:
            consts += [qs.absmax, qs.code, getattr(qs, "offset", None)]
            if getattr(qs, "state2", None) is not None:
                consts += [qs.state2.absmax, qs.state2.code]
    out["const_bytes"] = nbytes([c for c in consts if torch.is_tensor(c)])
    out["weight_dtypes"] = sorted(out["weight_dtypes"])
    out["weight_types"] = sorted(out["weight_types"])
    return out


def main() -> None:
    args = parse()
    acc = make_accelerator(args.strategy)
    rank = acc.process_index
    from transformers import LlamaConfig, LlamaForCausalLM

    bf16 = acc.mixed_precision == "bf16"
    cfg = LlamaConfig.from_pretrained(args.model_dir)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)  # fp32: full fine-tuning keeps fp32 weights; DeepSpeed/FSDP cast for compute
    if args.pure_bf16:
        assert not bf16, "bf16-pure runs without mixed precision"
        model = model.to(torch.bfloat16)
    if args.method == "qlora":
        model = load_qlora(model, args, acc, torch.bfloat16 if bf16 else torch.float32)
    if args.method in ("lora", "qlora"):
        from peft import LoraConfig, get_peft_model

        if bf16 and args.method == "lora":
            model = model.to(torch.bfloat16)  # ftl loads the frozen base in the compute dtype
        lcfg = LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r, lora_dropout=0.0,
                          target_modules=args.lora_targets.split(","), task_type="CAUSAL_LM")
        model = get_peft_model(model, lcfg, autocast_adapter_dtype=not args.pure_bf16)  # fp32 adapters unless pure
    trainable = [p for p in model.parameters() if p.requires_grad]
    report: dict = {
        "rank": rank,
        "world_size": dist.get_world_size(),
        "backend": dist.get_backend(),
        "distributed_type": str(acc.distributed_type),
        "mixed_precision": acc.mixed_precision,
        "strategy": args.strategy,
        "method": args.method,
        "params_total": sum(p.numel() for p in model.parameters()),
        "params_trainable": sum(p.numel() for p in trainable),
    }
    opt = torch.optim.AdamW(trainable, lr=1e-3)  # foreach is not the default on the CPU: no matter here
    data = torch.randint(0, cfg.vocab_size, (args.batch * 2, args.seq), generator=torch.Generator().manual_seed(1))
    dl = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(data), batch_size=args.batch)
    model, opt, dl = acc.prepare(model, opt, dl)
    engine_opt = getattr(model, "optimizer", None)  # DeepSpeed's ZeRO optimizer
    base = inner_optimizer(opt)
    report["optimizer_chain"] = [type(opt).__name__, type(engine_opt).__name__, type(base).__name__]

    def roots() -> dict:
        return {"zero": engine_opt, "opt": base, "model": model}

    def param_view() -> dict:
        out = {"local_bytes": 0, "full_resident_bytes": 0, "storage_bytes": 0, "dtypes": set(), "persistent_params": 0}
        local = []
        for p in model.parameters():
            if hasattr(p, "ds_tensor"):  # ZeRO-3 partition; p.data is empty unless gathered or persistent
                local.append(p.ds_tensor)
                if getattr(p, "ds_persist", False):
                    out["persistent_params"] += p.ds_numel
                    out["full_resident_bytes"] += p.data.numel() * p.data.element_size()
                out["dtypes"].add(str(p.ds_tensor.dtype))
            else:
                local.append(_local(p))
                out["dtypes"].add(str(p.dtype))
        out["local_bytes"] = elem_bytes(local)
        out["storage_bytes"] = nbytes(local)
        out["dtypes"] = sorted(out["dtypes"])
        if args.method == "qlora":
            out["nf4"] = quant_view(model)
        return out

    def ds_buffers() -> dict:
        """DeepSpeed's own model-state tensors (0 outside DeepSpeed)."""
        z = engine_opt
        if z is None or args.strategy not in ("zero1", "zero2", "zero3"):
            return {}
        out = {}
        if args.strategy in ("zero1", "zero2"):
            out["master"] = nbytes(z.single_partition_of_fp32_groups)
            out["master_grad"] = nbytes([t.grad for t in z.single_partition_of_fp32_groups])
            grads = [g for gs in getattr(z, "averaged_gradients", {}).values() if gs for g in gs]
            out["grad_partition"] = elem_bytes(grads)
            out["grad_partition_storage"] = nbytes(grads)
            out["grads_in_partition"] = nbytes([getattr(z, "grads_in_partition", None)])
            buckets = getattr(z, "ipg_buckets", {})
            out["ipg_buffers"] = nbytes([getattr(b, "buffer", None) for b in buckets.values()])
        else:
            out["master"] = nbytes(z.fp32_partitioned_groups_flat)
            out["master_grad"] = nbytes([t.grad for t in z.fp32_partitioned_groups_flat])
            out["grad_partition"] = nbytes([z.grad_partitions_flat_buffer])
            out["ipg_buffers"] = nbytes([getattr(b, "buffer", None) for b in z.ipg_buckets.values()])
            out["lp_partition_flat"] = nbytes(z.fp16_partitioned_groups_flat)
        return out

    def grad_view() -> dict:
        gs = [p.grad for p in model.parameters() if p.grad is not None]
        return {"bytes": elem_bytes(gs), "dtypes": sorted({str(g.dtype) for g in gs})}

    at_step: dict = {}

    def wrap_step(o, key):
        inner = o.step

        def step(*a, **k):
            at_step[key] = {
                "params": param_view(),
                "grads": grad_view(),
                "ds": ds_buffers(),
                "memory": snapshot(roots()),
            }
            return inner(*a, **k)

        o.step = step

    if engine_opt is not None and hasattr(engine_opt, "independent_gradient_partition_epilogue"):
        # ZeRO-1/2: the end of backward, before DeepSpeed releases its reduce buckets
        inner_epi = engine_opt.independent_gradient_partition_epilogue

        def epilogue(*a, **k):
            at_step["backward_end"] = {"ds": ds_buffers(), "memory": snapshot(roots())}
            return inner_epi(*a, **k)

        engine_opt.independent_gradient_partition_epilogue = epilogue
    wrap_step(base, "inner_step")  # gradients (incl. DeepSpeed's fp32 partition grads) all alive here
    if engine_opt is not None and engine_opt is not base:
        wrap_step(engine_opt, "zero_step")

    report["after_prepare"] = {"params": param_view(), "ds": ds_buffers(), "memory": snapshot(roots())}
    model.train()
    (x,) = next(iter(dl))
    out = model(input_ids=x, labels=x)
    acc.backward(out.loss)  # under DeepSpeed this also runs the engine's step
    loss = out.loss.detach().float()
    del out
    report["after_backward"] = {"params": param_view(), "grads": grad_view(), "ds": ds_buffers()}
    opt.step()
    opt.zero_grad()
    report.update(at_step)
    state, dtypes = optimizer_state_bytes(base)
    report["after_step"] = {
        "params": param_view(),
        "ds": ds_buffers(),
        "optimizer_state_bytes": state,
        "optimizer_state_dtypes": dtypes,
        "memory": snapshot(roots()),
    }
    mean = acc.reduce(loss.clone(), reduction="mean")
    report["loss"] = [loss.item(), mean.item()]
    assert torch.isfinite(mean), "non-finite loss"
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"rank{rank}.json"), "w") as f:
        json.dump(report, f, indent=1, default=str)
    acc.wait_for_everyone()
    acc.end_training()


if __name__ == "__main__":
    sys.exit(main())
