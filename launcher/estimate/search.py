"""`ftl plan`: search GPUs, GPU counts, strategies, offload, micro-batch, checkpointing and method for
the fastest or cheapest way to run a recipe, with its total time and cost (docs/planning.md).

Pure: no torch. Every candidate is priced by the estimator (`estimate_arch`), so a plan and
`ftl estimate` of its launch line agree. The search reuses the model's spec and architecture and
memoizes the estimator's pure parts (parameter plan, activations, model states, FLOPs, data size)
for the duration of one search, which is what makes a full search take well under a second.
"""

from __future__ import annotations

import math
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from launcher.core.durations import format_duration
from launcher.core.errors import FtlError
from launcher.estimate.arch import Arch
from launcher.estimate.compute import total_cost
from launcher.estimate.estimator import Estimate, build_arch, estimate_arch
from launcher.estimate.memo import Memo
from launcher.estimate.memory import GiB
from launcher.spec.catalog import ModelSpec, find_gpu, gpus, provider_facts, resolve_model
from launcher.spec.recipe import PURE_BF16_STRATEGIES, RENTED, STRATEGIES, Cluster, Parallel, Recipe


STRATEGY_LABEL = {"ddp": "DDP", "zero1": "ZeRO-1", "zero2": "ZeRO-2", "zero3": "ZeRO-3", "fsdp": "FSDP"}
OFFLOAD_LABEL = {"none": "", "optimizer": " + optimizer offload", "params": " + param offload"}
# (strategy, offload) pairs searched on more than one GPU. DDP cannot offload; ZeRO-1/2 offload the
# optimizer only; ZeRO-3 the optimizer or the parameters too; FSDP2's offload is all or nothing
# (parameters, gradients and optimizer), which the estimator models as "params".
MULTI_GPU_STRATEGIES: tuple[tuple[str, str], ...] = (
    ("ddp", "none"),
    ("zero1", "none"), ("zero1", "optimizer"),
    ("zero2", "none"), ("zero2", "optimizer"),
    ("zero3", "none"), ("zero3", "optimizer"), ("zero3", "params"),
    ("fsdp", "none"), ("fsdp", "params"),
)
# On one GPU sharding does nothing; ZeRO-Offload still moves the optimizer (and ZeRO-3 the parameters) to the host.
SINGLE_GPU_STRATEGIES: tuple[tuple[str, str], ...] = (("ddp", "none"), ("zero2", "optimizer"), ("zero3", "params"))



# ---------------------------------------------------------------------------------------------
# Candidates


@dataclass
class Candidate:
    profile: str  # the cluster profile's name
    profile_path: str | None
    provider: str
    gpu: str  # catalog key
    gpu_name: str
    nodes: int
    gpus_per_node: int
    strategy: str
    offload: str
    micro_batch_size: int
    grad_accum: int
    gradient_checkpointing: bool
    method: str
    fits: bool
    peak_bytes: int
    usable_bytes: int
    shortfall_bytes: int
    cpu_bytes_per_node: int
    step_time_s: float | None
    train_time_s: float | None
    setup_s: float  # instance boot + weight download (rented targets)
    total_time_s: float | None
    price_per_gpu_hour: float
    cost_usd: float | None
    tokens: int | None
    cost_per_mtok_usd: float | None
    frontier: bool = False
    index: int = 0  # order of enumeration (a stable tie-break)

    @property
    def world(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def short_gpu(self) -> str:
        n = self.gpu_name
        for p in ("NVIDIA ", "AMD "):
            n = n.removeprefix(p)
        return n.split(" (")[0]

    @property
    def label(self) -> str:
        return f"{STRATEGY_LABEL[self.strategy]}{OFFLOAD_LABEL[self.offload]} on {self.nodes}×{self.gpus_per_node} {self.short_gpu}"

    @property
    def settings(self) -> str:
        ck = "ckpt" if self.gradient_checkpointing else "no ckpt"
        return f"{self.method}, micro {self.micro_batch_size} × accum {self.grad_accum}, {ck}"

    def to_json(self) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
        d["world_size"] = self.world
        d["label"] = self.label
        return d


def _key(c: Candidate, objective: str) -> tuple:
    """Sort key: the objective, then the other measure, then fewer GPUs, then enumeration order."""
    t, p = c.total_time_s or math.inf, c.cost_usd if c.cost_usd is not None else math.inf
    return (t, p, c.world, c.index) if objective == "time" else (p, t, c.world, c.index)


@dataclass
class PlanResult:
    recipe: Recipe
    objective: str
    budget_usd: float | None
    deadline_s: float | None
    candidates: list[Candidate]  # every candidate estimated, fitting or not, in enumeration order
    chosen: Candidate
    explanation: str
    launch_command: str
    skipped: list[str] = field(default_factory=list)  # profiles left out, and why

    @property
    def fitting(self) -> list[Candidate]:
        return [c for c in self.candidates if c.fits]

    @property
    def frontier(self) -> list[Candidate]:
        return sorted((c for c in self.candidates if c.frontier), key=lambda c: _key(c, "time"))

    def ranked(self) -> list[Candidate]:
        """Fitting candidates, best first by the objective."""
        return sorted(self.fitting, key=lambda c: _key(c, self.objective))

    def to_json(self, limit: int | None = None) -> dict[str, Any]:
        ranked = self.ranked()
        return {
            "recipe": self.recipe.name,
            "objective": self.objective,
            "budget_usd": self.budget_usd,
            "deadline_s": self.deadline_s,
            "estimated": len(self.candidates),
            "fitting": len(ranked),
            "candidates": [c.to_json() for c in (ranked if limit is None else ranked[:limit])],
            "frontier": [c.to_json() for c in self.frontier],
            "chosen": self.chosen.to_json(),
            "explanation": self.explanation,
            "launch_command": self.launch_command,
            "skipped": self.skipped,
        }


# ---------------------------------------------------------------------------------------------
# Memoized estimator parts (scoped to one search)


# ---------------------------------------------------------------------------------------------
# Search


def runnable(recipe: Recipe, strategies: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    """The (strategy, offload) pairs the recipe can run under: bf16-pure rules out DeepSpeed ZeRO, whose bf16
    optimizer keeps fp32 master weights."""
    if recipe.train.precision == "bf16-pure":
        return [so for so in strategies if so[0] in PURE_BF16_STRATEGIES]
    return list(strategies)


def _pow2_upto(n: int) -> list[int]:
    out, k = [], 1
    while k <= n:
        out.append(k)
        k *= 2
    if out[-1] != n:
        out.append(n)
    return out


def setup_seconds(cluster: Cluster, weight_bytes: int) -> float:
    """Instance boot plus weight download before the first step: rented targets only, unless the profile sets them."""
    facts = provider_facts().get(cluster.provider, {}) if cluster.provider in RENTED else {}
    boot = cluster.boot_seconds if cluster.boot_seconds is not None else float(facts.get("boot_seconds") or 0.0)
    bw = cluster.download_bandwidth_gbps if cluster.download_bandwidth_gbps is not None else facts.get("download_bandwidth_gbps")
    download = weight_bytes / (bw * 1e9) if bw else 0.0
    return float(boot) + download


def global_batch(recipe: Recipe) -> int:
    return recipe.train.micro_batch_size * recipe.train.grad_accum * recipe.cluster.world_size


def _method_recipe(recipe: Recipe, method: str) -> Recipe:
    if method == recipe.method:
        return recipe
    r = recipe.model_copy(deep=True)
    try:
        r.method = method  # type: ignore[assignment]  (validate_assignment checks it)
        if method == "qlora" and r.quantization.bits != 4:
            r.quantization.bits = 4
    except Exception as e:  # noqa: BLE001
        raise FtlError(f"--allow-method {method}: {e}") from None
    return r


def _worlds(cl: Cluster, max_gpus: int | None) -> list[tuple[int, int]]:
    """(nodes, gpus per node): 1, 2, 4, ... GPUs of one node, then 2..N full nodes."""
    out = [(1, g) for g in _pow2_upto(cl.gpus_per_node)]
    out += [(n, cl.gpus_per_node) for n in range(2, cl.nodes + 1)]
    return [(n, g) for n, g in out if max_gpus is None or n * g <= max_gpus]


def enumerate_candidates(
    recipe: Recipe,
    clusters: Sequence[Cluster],
    cluster_paths: Sequence[str | None] | None = None,
    max_gpus: int | None = None,
    allow_methods: Sequence[str] = (),
    spec: ModelSpec | None = None,
    arch: Arch | None = None,
    strategies: Sequence[tuple[str, str]] | None = None,
    worlds: dict[int, list[tuple[int, int]]] | None = None,
) -> tuple[list[Candidate], list[str]]:
    """Estimate every candidate; returns them (fitting or not) and the profiles skipped with why."""
    spec = spec or resolve_model(recipe.model)
    arch = arch or build_arch(recipe, spec)
    paths = list(cluster_paths) if cluster_paths is not None else [None] * len(clusters)
    gb = global_batch(recipe)
    methods = [recipe.method] + [m for m in dict.fromkeys(allow_methods) if m != recipe.method]
    mrecipes = {m: _method_recipe(recipe, m) for m in methods}
    weight_bytes = 0 if spec.origin == "local" else arch.published_bytes  # downloaded before the first step

    out: list[Candidate] = []
    skipped: list[str] = []
    trains: dict[tuple, Any] = {}
    pars = {so: Parallel.model_construct(strategy=so[0], offload=so[1]) for so in MULTI_GPU_STRATEGIES + SINGLE_GPU_STRATEGIES}
    memo = Memo()  # shared by every candidate of this search (one base recipe)
    for ci, (prof, ppath) in enumerate(zip(clusters, paths)):
        if not prof.gpu:
            skipped.append(f"{prof.name}: no gpu named in the profile")
            continue
        try:
            gpu = find_gpu(prof.gpu)
        except FtlError as e:
            skipped.append(f"{prof.name}: {e}")
            continue
        shapes = worlds[ci] if worlds is not None else _worlds(prof, max_gpus)
        for nodes, gpn in shapes:
            world = nodes * gpn
            if gb % world:
                continue  # the global batch cannot be split evenly over this many GPUs
            cl = prof.model_copy(update={"nodes": nodes, "gpus_per_node": gpn})
            so_list = runnable(recipe, strategies if strategies is not None else
                               (SINGLE_GPU_STRATEGIES if world == 1 else MULTI_GPU_STRATEGIES))
            for method, mr in mrecipes.items():
                for mb in _pow2_upto(gb // world):
                    if (gb // world) % mb:
                        continue
                    accum = gb // (world * mb)
                    for ck in (True, False):
                        tk = (method, mb, accum, ck)
                        if tk not in trains:
                            trains[tk] = mr.train.model_copy(update={"micro_batch_size": mb, "grad_accum": accum, "gradient_checkpointing": ck})
                        for so in so_list:
                            par = pars.get(so) or Parallel.model_construct(strategy=so[0], offload=so[1])
                            r = mr.model_copy(update={"train": trains[tk], "parallel": par, "cluster": cl})
                            e = estimate_arch(r, spec, arch, strategy=so[0], memo=memo)
                            out.append(_candidate(e, prof, ppath, gpu.key, gpu.name, weight_bytes, len(out)))
    return out, skipped


def _candidate(e: Estimate, prof: Cluster, ppath: str | None, gpu_key: str, gpu_name: str, weight_bytes: int, index: int) -> Candidate:
    r = e.recipe
    cl = r.cluster
    cpu_ok = cl.cpu_memory_gib is None or e.memory.states.cpu <= cl.cpu_memory_gib * GiB
    fits = bool(e.fits) and cpu_ok
    setup = setup_seconds(cl, weight_bytes)
    total = cost = tokens = per_mtok = None
    if e.total_time_s is not None:
        total = e.total_time_s + setup
        cost = total_cost(total, cl.world_size, cl.price_per_gpu_hour)
        tokens = e.steps * e.tokens_per_step
        per_mtok = cost / (tokens / 1e6) if tokens else None
    return Candidate(
        profile=prof.name, profile_path=ppath, provider=prof.provider, gpu=gpu_key, gpu_name=gpu_name,
        nodes=cl.nodes, gpus_per_node=cl.gpus_per_node, strategy=e.strategy, offload=r.parallel.offload,
        micro_batch_size=r.train.micro_batch_size, grad_accum=r.train.grad_accum,
        gradient_checkpointing=r.train.gradient_checkpointing, method=r.method, fits=fits,
        peak_bytes=e.memory.peak, usable_bytes=e.usable_bytes or 0, shortfall_bytes=e.shortfall_bytes,
        cpu_bytes_per_node=e.memory.states.cpu, step_time_s=e.step_time_s, train_time_s=e.total_time_s,
        setup_s=setup, total_time_s=total, price_per_gpu_hour=cl.price_per_gpu_hour, cost_usd=cost,
        tokens=tokens, cost_per_mtok_usd=per_mtok, index=index,
    )


def mark_frontier(cands: Sequence[Candidate]) -> list[Candidate]:
    """Mark the fitting candidates no other fitting candidate beats on both time and cost."""
    pts = sorted((c for c in cands if c.fits and c.total_time_s is not None), key=lambda c: _key(c, "time"))
    best_cost = math.inf
    front = []
    for c in pts:
        c.frontier = False
        if c.cost_usd < best_cost:  # type: ignore[operator]
            c.frontier = True
            best_cost = c.cost_usd  # type: ignore[assignment]
            front.append(c)
    return front


# ---------------------------------------------------------------------------------------------
# Explanation and launch line


def _usd(x: float) -> str:
    return f"${x:,.2f}"


def explain(chosen: Candidate, candidates: Sequence[Candidate], objective: str) -> str:
    """One sentence: why this candidate, against the next-smaller configuration that does not fit or the runner-up."""
    reasons = []
    # the largest smaller GPU count on the same GPU type where nothing fits
    smaller = [c for c in candidates if c.gpu == chosen.gpu and c.world < chosen.world]
    by_world: dict[tuple[int, int], list[Candidate]] = {}
    for c in smaller:
        by_world.setdefault((c.nodes, c.gpus_per_node), []).append(c)
    none_fit = [(w, cs) for w, cs in by_world.items() if not any(c.fits for c in cs)]
    if none_fit:
        (n, g), cs = max(none_fit, key=lambda x: (x[0][0] * x[0][1], x[0]))
        short = min(c.shortfall_bytes for c in cs)
        reasons.append(f"{n}×{g} {chosen.short_gpu} does not fit by {short / GiB:.1f} GiB")
    ranked = sorted((c for c in candidates if c.fits and c is not chosen), key=lambda c: _key(c, objective))
    other = next((c for c in ranked if (c.profile, c.world, c.strategy, c.offload) != (chosen.profile, chosen.world, chosen.strategy, chosen.offload)), None)
    if other is not None:
        if objective == "time":
            reasons.append(f"it is the fastest fitting plan ({format_duration(chosen.total_time_s)}, {_usd(chosen.cost_usd)}) "
                           f"against {format_duration(other.total_time_s)} and {_usd(other.cost_usd)} for {other.label} on {other.profile}")
        else:
            reasons.append(f"it is the cheapest fitting plan ({_usd(chosen.cost_usd)}, {format_duration(chosen.total_time_s)}) "
                           f"against {_usd(other.cost_usd)} and {format_duration(other.total_time_s)} for {other.label} on {other.profile}")
    else:
        reasons.append("it is the only configuration that fits")
    return f"{chosen.label} ({chosen.profile}, {chosen.settings}) because {' and '.join(reasons)}."


def _rel(p: str | None) -> str | None:
    if p is None:
        return None
    try:
        return str(Path(p).resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(p)


def launch_command(recipe: Recipe, c: Candidate, recipe_path: str | None = None, sets: Sequence[str] = ()) -> str:
    """The `ftl launch` line that runs candidate c (the user's own --set first, the plan's after)."""
    args = ["ftl", "launch", _rel(recipe_path or recipe.source) or recipe.name]
    args += ["--cluster", _rel(c.profile_path) or c.profile, "--nodes", str(c.nodes), "--gpus-per-node", str(c.gpus_per_node)]
    plan_keys = ("parallel.strategy", "parallel.offload", "train.micro_batch_size", "train.grad_accum",
                 "train.gradient_checkpointing", "method")
    for s in sets:
        if s.split("=", 1)[0].strip() not in plan_keys:
            args += ["--set", s]
    vals = [c.strategy, c.offload, c.micro_batch_size, c.grad_accum, str(c.gradient_checkpointing).lower(), c.method]
    for k, v in zip(plan_keys, vals):
        args += ["--set", f"{k}={v}"]
    return " ".join(shlex.quote(a) for a in args)


# ---------------------------------------------------------------------------------------------
# The plan


def _closest_message(fitting: list[Candidate], budget: float | None, deadline: float | None) -> str:
    def excess(c: Candidate) -> float:
        x = 0.0
        if budget is not None:
            x = max(x, c.cost_usd / budget if budget > 0 else (math.inf if c.cost_usd > 0 else 0))
        if deadline is not None:
            x = max(x, c.total_time_s / deadline)
        return x

    best = min(fitting, key=lambda c: (excess(c), _key(c, "cost")))
    limits = []
    if budget is not None:
        limits.append(f"budget {_usd(budget)}")
    if deadline is not None:
        limits.append(f"deadline {format_duration(deadline)}")
    over = []
    if budget is not None and best.cost_usd > budget:
        over.append(f"{_usd(best.cost_usd - budget)} over budget")
    if deadline is not None and best.total_time_s > deadline:
        over.append(f"{format_duration(best.total_time_s - deadline)} past the deadline")
    return (f"no plan meets the {' and the '.join(limits)} ({len(fitting)} fitting candidates). The closest is "
            f"{best.label} on {best.profile} ({best.settings}): {format_duration(best.total_time_s)}, {_usd(best.cost_usd)}"
            f" ({', '.join(over)}). Raise the limit, allow more GPUs or profiles, or try --allow-method qlora.")


def plan(
    recipe: Recipe,
    clusters: Sequence[Cluster],
    objective: str = "time",
    budget_usd: float | None = None,
    deadline_s: float | None = None,
    max_gpus: int | None = None,
    allow_methods: Sequence[str] = (),
    cluster_paths: Sequence[str | None] | None = None,
    recipe_path: str | None = None,
    sets: Sequence[str] = (),
    spec: ModelSpec | None = None,
    arch: Arch | None = None,
) -> PlanResult:
    """The fastest (objective="time") or cheapest ("cost") candidate that fits and meets budget and deadline."""
    if objective not in ("time", "cost"):
        raise FtlError(f"--objective {objective!r}: choose time or cost")
    if budget_usd is None and recipe.budget.max_cost_usd is not None:
        budget_usd = recipe.budget.max_cost_usd
    if deadline_s is None and recipe.budget.max_hours is not None:
        deadline_s = recipe.budget.max_hours * 3600
    cands, skipped = enumerate_candidates(recipe, clusters, cluster_paths, max_gpus, allow_methods, spec, arch)
    if not cands:
        why = "; ".join(skipped) or f"no GPU count divides the global batch of {global_batch(recipe)}"
        raise FtlError(f"nothing to plan for {recipe.name}: {why}")
    if any(c.total_time_s is None for c in cands):
        raise FtlError(f"{recipe.name}: the dataset size is unknown, so time and cost are too; set data.num_examples "
                       "(and data.avg_tokens_per_example) or train.max_steps")
    fitting = [c for c in cands if c.fits]
    if not fitting:
        best = min(cands, key=lambda c: (c.shortfall_bytes / max(c.usable_bytes, 1), c.index))
        raise FtlError(f"nothing fits {recipe.name}: the closest is {best.label} on {best.profile} ({best.settings}), "
                       f"{best.shortfall_bytes / GiB:.1f} GiB over its {best.usable_bytes / GiB:.1f} GiB usable per GPU. "
                       "Add profiles with more or larger GPUs, raise --max-gpus, or try --allow-method qlora.")
    mark_frontier(cands)
    ok = [c for c in fitting if (budget_usd is None or c.cost_usd <= budget_usd)
          and (deadline_s is None or c.total_time_s <= deadline_s)]
    if not ok:
        raise FtlError(_closest_message(fitting, budget_usd, deadline_s))
    chosen = min(ok, key=lambda c: _key(c, objective))
    return PlanResult(
        recipe=recipe, objective=objective, budget_usd=budget_usd, deadline_s=deadline_s, candidates=cands,
        chosen=chosen, explanation=explain(chosen, cands, objective),
        launch_command=launch_command(recipe, chosen, recipe_path, sets), skipped=skipped,
    )


def choose_strategy(recipe: Recipe, spec: ModelSpec | None = None, arch: Arch | None = None) -> str:
    """`parallel.strategy: auto`: the fastest strategy that fits on the recipe's own cluster and world,
    keeping its micro-batch, accumulation, checkpointing, method and offload. Falls back to the
    strategy with the least memory shortfall (so the estimate then reports it does not fit)."""
    cl = recipe.cluster
    world = cl.world_size
    if world == 1:
        return "ddp"
    if not cl.gpu:
        return "ddp"  # no GPU named: nothing to compare (CPU processes run DDP on gloo)
    off = recipe.parallel.offload
    strategies = runnable(recipe, [(s, off) for s in STRATEGIES if not (s == "ddp" and off != "none")])
    if not strategies:
        return "fsdp"  # bf16-pure with an offload: FSDP2 (its offload is all or nothing)
    cands, _ = _single_world(recipe, strategies, spec, arch)
    fitting = [c for c in cands if c.fits]
    if fitting:
        return min(fitting, key=lambda c: _key(c, "time")).strategy
    return min(cands, key=lambda c: (c.shortfall_bytes, c.index)).strategy


def _single_world(recipe: Recipe, strategies, spec, arch) -> tuple[list[Candidate], list[str]]:
    spec = spec or resolve_model(recipe.model)
    arch = arch or build_arch(recipe, spec)
    gpu = find_gpu(recipe.cluster.gpu)  # type: ignore[arg-type]
    out = []
    memo = Memo()
    for so in strategies:
        r = recipe.model_copy(update={"parallel": Parallel.model_construct(strategy=so[0], offload=so[1])})
        e = estimate_arch(r, spec, arch, strategy=so[0], memo=memo)
        out.append(_candidate(e, recipe.cluster, None, gpu.key, gpu.name, 0, len(out)))
    return out, []


def resolve_strategy(recipe: Recipe, spec: ModelSpec | None = None, arch: Arch | None = None) -> str:
    """The recipe's strategy, with `auto` replaced by the planner's choice for its own cluster and world size."""
    s = recipe.parallel.strategy
    if s != "auto":
        return s
    return choose_strategy(recipe, spec, arch)


# ---------------------------------------------------------------------------------------------
# The estimate of one recipe, and what would make it fit


def estimate(recipe: Recipe, strategy: str | None = None, suggest: bool = True) -> Estimate:
    """`ftl estimate`: the recipe's estimate under its strategy (auto resolved here), with the single changes
    that would make it fit when it does not."""
    spec = resolve_model(recipe.model)
    arch = build_arch(recipe, spec)
    est = estimate_arch(recipe, spec, arch, strategy=strategy or resolve_strategy(recipe, spec, arch))
    if suggest and est.fits is False:
        est.suggestions = suggestions(est)
    return est


def _variants(r: Recipe, strategy: str, world: int) -> list[tuple[str, dict[str, Any]]]:
    out: list[tuple[str, dict[str, Any]]] = []
    t = r.train
    if not t.gradient_checkpointing:
        out.append(("enable gradient checkpointing (about 1/3 more compute)", {"train.gradient_checkpointing": True}))
    if t.micro_batch_size > 1:
        out.append((f"micro_batch_size 1 with grad_accum {t.grad_accum * t.micro_batch_size} (same global batch)",
                    {"train.micro_batch_size": 1, "train.grad_accum": t.grad_accum * t.micro_batch_size}))
    if t.optimizer == "adamw" and r.method in ("full", "freeze"):
        out.append(("8-bit AdamW (bitsandbytes)", {"train.optimizer": "adamw_8bit"}))
    pure = t.precision == "bf16-pure"
    if world > 1 and strategy not in ("zero3", "fsdp"):
        out.append(("shard everything with FSDP", {"parallel.strategy": "fsdp"}) if pure else
                   ("shard everything with ZeRO-3", {"parallel.strategy": "zero3"}))
    if r.parallel.offload == "none" and r.method in ("full", "freeze") and not pure:
        out.append(("offload optimizer states to CPU (ZeRO)", {"parallel.offload": "optimizer", "parallel.strategy": "zero3" if world > 1 else "zero2"}))
    if r.method == "full":
        out.append(("LoRA instead of full fine-tuning", {"method": "lora"}))
    if r.method == "lora":
        out.append(("QLoRA (4-bit NF4 base)", {"method": "qlora"}))
    return out


def _with(r: Recipe, changes: dict[str, Any]) -> Recipe:
    new = r.model_copy(deep=True)
    for path, value in changes.items():
        *parents, last = path.split(".")
        node: Any = new
        for k in parents:
            node = getattr(node, k)
        setattr(node, last, value)  # validate_assignment checks the value
    return new


def suggestions(est: Estimate, limit: int = 4) -> list[dict[str, Any]]:
    """Single changes that make the recipe fit, in order of how little they cost in speed and quality."""
    r = est.recipe
    out: list[dict[str, Any]] = []
    for label, changes in _variants(r, est.strategy, est.world_size):
        try:
            alt = _with(r, changes)
            if "parallel.strategy" in changes or r.parallel.strategy != "auto":
                strategy = changes.get("parallel.strategy", est.strategy)
            else:  # an auto recipe: its strategy is chosen again for the changed recipe
                strategy = resolve_strategy(alt, est.model, est.arch)
            e = estimate_arch(alt, est.model, est.arch, strategy=strategy)
        except Exception:  # a variant that does not validate is simply not suggested
            continue
        if e.fits:
            out.append({"change": label, "set": changes, "peak_bytes": e.memory.peak, "usable_bytes": e.usable_bytes,
                        "step_time_s": e.step_time_s})
        if len(out) >= limit:
            break
    if est.gpu is not None:  # the smallest catalog GPU with more memory that holds it
        for g in sorted(gpus(), key=lambda k: gpus()[k]["memory_bytes_reported"]):
            if gpus()[g]["memory_bytes_reported"] <= est.gpu.memory_bytes:
                continue
            e = estimate_arch(_with(r, {"cluster.gpu": g}), est.model, est.arch, strategy=est.strategy)
            if e.fits:
                out.append({"change": f"a GPU with more memory: {e.gpu.name}", "set": {"cluster.gpu": g},
                            "peak_bytes": e.memory.peak, "usable_bytes": e.usable_bytes, "step_time_s": e.step_time_s})
                break
    return out
