"""Architectures without an analytic builder, taken from the model itself (no torch here).

`launcher.train.probe` builds the model from config.json on torch's meta device and under
FakeTensorMode in a subprocess; this module runs it, caches its answer per user in
$FTL_CACHE/inventories/ (else $XDG_CACHE_HOME/ftl/inventories/, else ~/.cache/ftl/inventories/), one
file per `<model_type>-<hash of config.json and head>` that also records the transformers version it
was taken with, and turns it into the estimator's `Arch` (parameters, Linear modules, layers) and, per
training variant (method, precision, LoRA, freeze, attention), into activation bytes and FLOPs.

The protocol (JSON in on stdin, out on stdout): {"config", "head", "num_labels", "variants": {key:
variant}} -> {"transformers", "inventory", "measurements": {key: {"runs": [...]}}, "failed": {key:
reason}} or {"error": "build", "reason"}. docs/estimation.md describes what is measured and its limits.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import math
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from launcher.core.errors import FtlError
from launcher.core.files import read_json, write_json
from launcher.estimate.arch import Arch, Block, Head, Linear, dropout_from_config
from launcher.estimate.params import ParamPlan, modules_to_save, peft_target_modules, plan_params
from launcher.spec.catalog import cache_root
from launcher.spec.recipe import Recipe

PROBE_TIMEOUT_S = 600
# The probe runs batches of 1 and 2 at two lengths, L and 2L: batch 2 minus batch 1 is what a sequence
# adds (L and 2L separate s from s^2), batch 1 minus that what the batch shares. L is 16 unless the
# model works in chunks and pads to them (Mamba-2's mamba_chunk_size, the gated delta rule's 64 of
# linear-attention layers), where L is the chunk, so that both lengths are whole chunks.
PROBE_LENGTH = 16
CHUNK_KEYS = ("mamba_chunk_size", "chunk_size", "ssm_chunk_size")
LINEAR_ATTENTION_CHUNK = 64  # fla / transformers torch_chunk_gated_delta_rule chunk_size
ROUTED = re.compile(r"(^|\.)experts\.")

# Called with one line before a probe starts (the CLI prints it); None: silent.
on_probe: Callable[[str], None] | None = None


class ProbeError(FtlError):
    """The probe could not run or could not build the model."""


def cache_dir() -> Path:
    return cache_root() / "inventories"


@dataclass(frozen=True)
class ProbeRef:
    """Where an Arch's probe answer lives and what it was asked for."""

    path: str
    config: dict
    head: str
    num_labels: int
    inventory: dict


def _transformers_version() -> str:
    missing = [m for m in ("torch", "transformers") if importlib.util.find_spec(m) is None]
    if missing:
        raise ProbeError(
            f"estimating an architecture ftl has no builder for needs {' and '.join(missing)} in this Python "
            f"({sys.executable}): pip install torch transformers (scripts/setup does)")
    return importlib.metadata.version("transformers")


def _cache_path(cfg: dict, head: str, num_labels: int) -> Path:
    canon = json.dumps({"config": cfg, "head": head, "num_labels": num_labels if head == "seq_cls" else None},
                       sort_keys=True, default=str)
    digest = hashlib.sha256(canon.encode()).hexdigest()[:16]
    mt = re.sub(r"[^A-Za-z0-9_.-]", "_", str(cfg.get("model_type", "unknown")))[:64]
    return cache_dir() / f"{mt}-{digest}.json"


def probe_shapes(cfg: dict) -> list[list[int]]:
    """(batch, sequence) of the probe's runs for this config (see PROBE_LENGTH)."""
    length = PROBE_LENGTH
    for owner in (cfg, cfg.get("text_config") or {}):
        for k in CHUNK_KEYS:
            v = owner.get(k)
            if isinstance(v, int) and not isinstance(v, bool) and 0 < v <= 4096:
                length = max(length, v)
        if "linear_attention" in (owner.get("layer_types") or []):
            length = max(length, LINEAR_ATTENTION_CHUNK)
    return [[1, length], [1, 2 * length], [2, length], [2, 2 * length]]


def _run_probe(cfg: dict, head: str, num_labels: int, variants: dict[str, dict], recipes: list[dict]) -> dict:
    request = {"config": cfg, "head": head, "num_labels": num_labels, "variants": variants, "recipes": recipes,
               "shapes": probe_shapes(cfg)}
    env = dict(os.environ, TRANSFORMERS_VERBOSITY="error", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONWARNINGS="ignore")
    try:
        proc = subprocess.run([sys.executable, "-m", "launcher.train.probe"], input=json.dumps(request),
                              capture_output=True, text=True, timeout=PROBE_TIMEOUT_S, env=env)
    except subprocess.TimeoutExpired:
        raise ProbeError(f"model_type {cfg.get('model_type')!r}: the architecture probe ran past {PROBE_TIMEOUT_S} s") from None
    if proc.returncode != 0 or not proc.stdout.strip():
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1][:300]
        raise ProbeError(f"model_type {cfg.get('model_type')!r}: the architecture probe failed ({tail})")
    answer = json.loads(proc.stdout)
    if answer.get("error") == "build":
        raise ProbeError(f"model_type {cfg.get('model_type')!r}: transformers cannot build this config.json "
                         f"({answer['reason']}); check the config, or upgrade transformers for a newer architecture")
    return answer


def _load(cfg: dict, head: str, num_labels: int, variants: dict[str, dict] | None = None,
          recipes: list[Recipe] = ()) -> tuple[Path, dict]:
    """The cached answer for this config, probing (once) what is missing: the inventory (with the
    variants of `recipes`, worked out by the probe from it), or variants."""
    version = _transformers_version()
    path = _cache_path(cfg, head, num_labels)
    cached = read_json(path, None) if path.is_file() else None
    if not isinstance(cached, dict) or cached.get("transformers") != version or "inventory" not in cached:
        cached = None
    known = {**cached.get("measurements", {}), **cached.get("failed", {})} if cached else {}
    want = {k: v for k, v in (variants or {}).items() if k not in known}
    if cached is not None and not want:
        return path, cached
    if on_probe is not None:
        what = "its architecture" if cached is None else f"{len(want)} training variant(s)"
        on_probe(f"probing {what} for model_type {cfg.get('model_type')!r} once (transformers {version}, "
                 f"meta device and fake tensors, no weights); cached in {path}")
    dumped = [r.model_dump(mode="json") for r in recipes] if cached is None else []
    answer = _run_probe(cfg, head, num_labels, want, dumped)
    if cached is not None:
        answer["measurements"] = {**cached.get("measurements", {}), **answer.get("measurements", {})}
        answer["failed"] = {**cached.get("failed", {}), **answer.get("failed", {})}
    answer["failed"] = {k: v for k, v in answer.get("failed", {}).items() if k not in answer["measurements"]}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, answer)
    except OSError:
        pass  # a read-only cache costs a probe next time, nothing else
    return path, answer


# ---------------------------------------------------------------------------------------------
# Inventory -> Arch


def _cfg(cfg: dict, *keys: str, default: Any = None) -> Any:
    for owner in (cfg, cfg.get("text_config") or {}):
        for k in keys:
            v = owner.get(k)
            if isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0:
                return v
    return default


def _split(inv: dict, head: Head) -> dict[str, list[dict]]:
    """Parameters by estimator block: embeddings, layer.<i>, final, head."""
    layers = inv["layers"]
    lpath = layers["path"] + "." if layers else None
    base = inv["base_prefix"] + "." if inv.get("base_prefix") else ""
    out_emb = inv.get("output_embedding")
    groups: dict[str, list[dict]] = {"embeddings": [], "final": [], "head": []}
    seen_layers = False
    for p in inv["params"]:
        name = p["name"]
        if lpath and name.startswith(lpath):
            idx = int(name[len(lpath):].split(".", 1)[0])
            groups.setdefault(f"layer.{idx}", []).append(p)
            seen_layers = True
        elif (head == "causal_lm" and out_emb and p["module"] == out_emb) or (base and not name.startswith(base)):
            groups["head"].append(p)
        else:
            groups["final" if seen_layers else "embeddings"].append(p)
    return groups


def _block(name: str, params: list[dict], prefix: str, linears: dict[str, dict], inv: dict,
           module_numel: dict[str, int], count: int = 1, indices: tuple[int, ...] = ()) -> Block:
    """One estimator Block from parameters whose names start with `prefix` (`module_numel`: the
    parameters of each module, which ZeRO-3 gathers together)."""
    lins: list[Linear] = []
    other: dict[str, int] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    modules: dict[str, int] = {}
    expert = 0
    for p in params:
        rel = p["name"][len(prefix):]
        numel = math.prod(p["shape"])
        if name == "embeddings" and p["module"] == inv.get("input_embedding"):
            rel = "embed_tokens"
        shapes[rel] = tuple(p["shape"])
        modules[rel] = module_numel.get(p["module"], numel)
        lin = linears.get(p["module"])
        if lin is not None and lin.get("weight_owned", True):
            short = lin["name"][len(prefix):]
            if not any(l.name == short for l in lins):
                lins.append(Linear(short, lin["in"], lin["out"], lin["bias"], lin["conv1d"]))
            continue
        if len(p["shape"]) >= 3 and ROUTED.search(rel):
            expert += numel
        else:
            other[rel] = numel
    return Block(name, count, tuple(lins), other, expert, shapes, modules, indices)


def arch_from_inventory(answer: dict, cfg: dict, head: Head, num_labels: int, path: str = "") -> Arch:
    inv = answer["inventory"]
    linears = {l["name"]: l for l in inv["linears"]}
    groups = _split(inv, head)
    lpath = inv["layers"]["path"] + "." if inv["layers"] else ""
    n_layers = inv["layers"]["count"] if inv["layers"] else 0
    module_numel: dict[str, int] = {}
    for p in inv["params"]:
        module_numel[p["module"]] = module_numel.get(p["module"], 0) + math.prod(p["shape"])
    # layers grouped by what they hold (names and shapes); each kind is one Block over its indices
    kinds: dict[tuple, list[int]] = {}
    for i in range(n_layers):
        sig = tuple((p["name"][len(f"{lpath}{i}."):], tuple(p["shape"])) for p in groups.get(f"layer.{i}", []))
        kinds.setdefault(sig, []).append(i)
    blocks = [_block("embeddings", groups["embeddings"], "", linears, inv, module_numel)]
    for idx in kinds.values():
        first = idx[0]
        blocks.append(_block("layer", groups.get(f"layer.{first}", []), f"{lpath}{first}.", linears, inv,
                             module_numel, count=len(idx), indices=tuple(idx)))
    blocks.append(_block("final", groups["final"], "", linears, inv, module_numel))
    blocks.append(_block("head", groups["head"], "", linears, inv, module_numel))
    emb = blocks[0].shapes.get("embed_tokens", (0, 0))
    vocab = int(emb[0]) if emb else int(_cfg(cfg, "vocab_size", default=0))
    hidden = int(emb[1]) if len(emb) > 1 else int(_cfg(cfg, "hidden_size", "n_embd", "d_model", "dim", default=0))
    heads = int(_cfg(cfg, "num_attention_heads", "n_head", "n_heads", default=1))
    experts = int(inv.get("experts") or 0)
    per_tok = int(inv.get("experts_per_token") or 0)
    total = sum(b.count * b.params for b in blocks)
    active = None
    if experts and per_tok and experts > per_tok:
        routed = 0
        for b in blocks:
            routed += b.count * (b.expert_params + sum(l.params for l in b.linears if ROUTED.search(l.name)))
        active = total - routed * (experts - per_tok) // experts
    inter = int(_cfg(cfg, "moe_intermediate_size", "intermediate_size", "n_inner", "ffn_dim", "hidden_dim",
                     "d_ff", default=4 * hidden))
    return Arch(
        model_type=str(cfg.get("model_type")),
        hidden=hidden,
        layers=n_layers,
        heads=heads,
        kv_heads=int(_cfg(cfg, "num_key_value_heads", "n_head_kv", default=heads)),
        head_dim=int(_cfg(cfg, "head_dim", default=max(1, hidden // max(1, heads)))),
        intermediate=inter,
        vocab=vocab,
        max_positions=int(_cfg(cfg, "max_position_embeddings", "n_positions", "max_seq_len", default=4096)),
        gated_mlp=False,
        encoder=bool(inv.get("encoder")),
        tie_embeddings=head == "causal_lm" and not blocks[-1].params,
        head=head,
        num_labels=num_labels,
        num_experts=experts,
        experts_per_token=per_tok,
        dtype=str(cfg.get("torch_dtype") or cfg.get("dtype") or "float32"),
        blocks=tuple(blocks),
        dropout=dropout_from_config(cfg),
        probe=ProbeRef(path, cfg, head, num_labels, inv),
        buffers=int(inv.get("buffers_bytes", 0)),
        active=active,
    )


def neighbours(recipe: Recipe) -> list[Recipe]:
    """The recipe and what a fit suggestion or a plan most often changes that the probe must measure
    apart: gradient checkpointing on and off."""
    flipped = recipe.model_copy(deep=True)
    flipped.train.gradient_checkpointing = not recipe.train.gradient_checkpointing
    return [recipe, flipped]


def probe_arch(cfg: dict, head: Head, num_labels: int, recipe: Recipe | None = None) -> Arch:
    """The Arch of a config.json ftl has no builder for (probing it once per user and transformers
    version; a first probe also measures `recipe`'s step and its `neighbours`)."""
    path, answer = _load(cfg, head, num_labels, recipes=neighbours(recipe) if recipe is not None else [])
    arch = arch_from_inventory(answer, cfg, head, num_labels, str(path))
    if head == "causal_lm" and arch.encoder:
        raise ProbeError(f"{cfg.get('model_type')} is an encoder: ftl trains it only for tasks that score sequences (classification, reward)")
    return arch


# ---------------------------------------------------------------------------------------------
# Variants and their measurements


def variant_key(variant: dict) -> str:
    return hashlib.sha256(json.dumps(variant, sort_keys=True).encode()).hexdigest()[:16]


def prefetch(arch: Arch, recipes: list[Recipe]) -> None:
    """Measure, in one probe process, every variant of `recipes` not measured yet (a search calls this
    before estimating them one by one)."""
    if arch.probe is None:
        return
    want: dict[str, dict] = {}
    for r in recipes:
        try:
            key, v = variant(arch, plan_params(arch, r), r)
        except FtlError:
            continue
        want[key] = v
    measurements(arch, want, strict=False)


def measurements(arch: Arch, variants: dict[str, dict], strict: bool = True) -> dict[str, dict]:
    """The measurements of `variants` ({key: variant}), probing all the missing ones in one process."""
    ref: ProbeRef = arch.probe
    _, answer = _load(ref.config, ref.head, ref.num_labels, variants)
    missing = {k: answer.get("failed", {}).get(k, "not measured") for k in variants if k not in answer["measurements"]}
    if missing and strict:
        k, reason = next(iter(missing.items()))
        raise ProbeError(f"model_type {arch.model_type!r}: the probe could not run a training step of "
                         f"{variants[k]['method']} in {variants[k]['precision']} ({reason})")
    return {k: answer["measurements"][k] for k in variants if k in answer["measurements"]}


@dataclass(frozen=True)
class Fit:
    """Bytes or FLOPs of one part for b sequences of s tokens: what each sequence adds (lin * s + quad
    * s^2) and what the batch shares (shared * s + const: rotary tables, masks, constants)."""

    lin: float
    quad: float
    shared: float = 0.0
    const: float = 0.0
    per_seq: float = 0.0  # a constant each sequence adds (FLOPs of a convolution's padding)

    def at(self, b: int, s: int) -> float:
        return b * (self.lin * s + self.quad * s * s + self.per_seq) + self.shared * s + self.const


def _line(y1: float, y2: float, s1: int, s2: int, through_zero_quad: bool) -> tuple[float, float]:
    """(lin, quad) of y = lin*s + quad*s^2 through both points, or (slope, intercept) of a line."""
    if through_zero_quad:
        quad = (y2 / s2 - y1 / s1) / (s2 - s1)
        return y1 / s1 - quad * s1, quad
    slope = (y2 - y1) / (s2 - s1)
    return slope, y1 - slope * s1


def fit(runs: list[dict], get: Callable[[dict], float], batch: bool = True, shape: str = "s+s2") -> Fit:
    """The Fit of one measured quantity over the probe's runs (`probe_shapes`). batch=False: per
    sequence from the batch-1 runs (FLOPs, linear in the batch), of `shape` "s+s2" (lin * s + quad *
    s^2: eager attention), "s+1" (lin * s + a constant per sequence: matmuls, a convolution's padding)
    or "s2" (the attention products alone)."""
    s1, s2 = runs[0]["s"], runs[1]["s"]
    y11, y12 = get(runs[0]), get(runs[1])
    if not batch:
        if shape == "s2":
            return Fit(0.0, y11 / (s1 * s1))
        if shape == "s+1":
            slope, per_seq = _line(y11, y12, s1, s2, False)
            return Fit(slope, 0.0, 0.0, 0.0, per_seq)
        return Fit(*_line(y11, y12, s1, s2, True))
    p1, p2 = get(runs[2]) - y11, get(runs[3]) - y12
    lin, quad = _line(p1, p2, s1, s2, True)
    shared, const = _line(y11 - p1, y12 - p2, s1, s2, False)
    return Fit(lin, quad, shared, const)


def saved_at(runs: list[dict], b: int, s: int) -> tuple[list[float], float]:
    """(per layer, outside the layers) bytes the body saves for b sequences of s tokens, fitted from the
    probe's runs; outside: embeddings and final norm (with the head and loss for classification)."""
    per_layer = [fit(runs, lambda r, i=i: r["saved"][i]).at(b, s) for i in range(len(runs[0]["saved"]))]
    return per_layer, fit(runs, lambda r: r["outside"]["saved"]).at(b, s)


def variant(arch: Arch, params: ParamPlan, recipe: Recipe) -> tuple[str, dict]:
    """(key, variant): what the probe must build and train to measure this recipe's step."""
    from_recipe: dict[str, Any] = {
        "method": "lora" if recipe.method == "qlora" else recipe.method,  # the probe's QLoRA step is LoRA's
        "precision": recipe.train.precision,
        "attn": "eager" if recipe.train.attn_implementation == "eager" else "sdpa",
        "input_rg": bool(params.embeddings_train or recipe.train.gradient_checkpointing),
    }
    inv = arch.probe.inventory
    if recipe.method in ("lora", "qlora"):
        modules = {p["module"].rsplit(".", 1)[-1] for p in inv["params"]}
        save = [m for m in modules_to_save(arch, recipe) if m.rsplit(".", 1)[-1] in modules]
        # numbers as JSON gives them back (a recipe's 32 and its dump's 32.0 are one variant)
        from_recipe.update(lora_r=int(recipe.lora.r), lora_alpha=float(recipe.lora.alpha), lora_dropout=float(recipe.lora.dropout),
                           lora_targets=peft_target_modules(params), modules_to_save=save)
    elif recipe.method == "freeze":
        groups = _split(inv, arch.head)
        k = min(recipe.freeze.trainable_layers, arch.layers)
        names = [p["name"] for g, ps in groups.items() if g.startswith("layer.") and int(g[6:]) >= arch.layers - k
                 for p in ps]
        names += [p["name"] for p in groups["final"]]
        if recipe.freeze.train_head:
            names += [p["name"] for p in groups["head"]]
            if arch.tie_embeddings:
                names += [p["name"] for p in groups["embeddings"] if p["module"] == inv.get("input_embedding")]
        from_recipe["trainable"] = sorted(names)
    return variant_key(from_recipe), from_recipe


def measured_runs(arch: Arch, params: ParamPlan, recipe: Recipe) -> list[dict]:
    key, v = variant(arch, params, recipe)
    return measurements(arch, {key: v})[key]["runs"]
