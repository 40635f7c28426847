"""`ftl plan`: search GPUs, GPU counts, strategies, offload, micro-batch, checkpointing and method for
the fastest or cheapest way to run a recipe, with its total time and cost (docs/planning.md).

Pure: no torch. Every candidate is priced by the estimator (`estimate_arch`), so a plan and
`ftl estimate` of its launch line agree. The search reuses the model's spec and architecture and
memoizes the estimator's pure parts (parameter plan, activations, model states, FLOPs, data size)
for the duration of one search, which is what makes a full search take well under a second.
"""

from __future__ import annotations

import itertools
import math
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence, get_args

from pydantic import ValidationError

from launcher.core.durations import format_duration
from launcher.core.errors import FtlError
from launcher.estimate import probed
from launcher.estimate.arch import Arch
from launcher.estimate.compute import total_cost
from launcher.estimate.estimator import Estimate, build_arch, estimate_arch
from launcher.estimate.memo import Memo
from launcher.estimate.memory import GiB
from launcher.spec.catalog import ModelSpec, find_gpu, gpus, lowest_shipped_price, provider_facts, resolve_model
from launcher.spec.recipe import PURE_BF16_STRATEGIES, RENTED, STRATEGIES, Cluster, Parallel, Recipe, Train, price_note


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
    precision: str
    cross_entropy: str
    activation_offloading: bool
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
    price_date: str | None
    price_age_days: int | None
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
        extra = [self.precision] if self.precision != "bf16" else []
        extra += [f"{self.cross_entropy} CE"] if self.cross_entropy != "standard" else []
        extra += ["activation offloading"] if self.activation_offloading else []
        return ", ".join([f"{self.method}, micro {self.micro_batch_size} × accum {self.grad_accum}, {ck}", *extra])

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

    def price_notes(self, limit: int | None = None) -> list[str]:
        """One line per profile whose price (among the ranked candidates shown) is older than PRICE_STALE_DAYS."""
        out: dict[str, str] = {}
        for c in self.ranked()[:limit]:
            note = price_note(c.profile, c.price_per_gpu_hour, c.price_date, c.price_age_days)
            if note:
                out.setdefault(c.profile, note)
        return list(out.values())

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
            "price_notes": self.price_notes(limit),
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


def _variant_recipe(recipe: Recipe, method: str, precision: str, cross_entropy: str,
                    offloading: bool) -> Recipe | None:
    """The recipe with another method / precision / cross-entropy / activation offloading (what --allow-* lets
    the plan change); None when that combination cannot run (e.g. bf16-pure with an fp16 QLoRA compute dtype)."""
    t = recipe.train
    if (method, precision, cross_entropy, offloading) == (recipe.method, t.precision, t.cross_entropy,
                                                          t.activation_offloading):
        return recipe
    r = recipe.model_copy(deep=True)
    try:
        r.method = method  # type: ignore[assignment]  (validate_assignment checks it)
        if method == "qlora" and r.quantization.bits != 4:
            r.quantization.bits = 4
        r.train.precision = precision  # type: ignore[assignment]
        r.train.cross_entropy = cross_entropy  # type: ignore[assignment]
        r.train.activation_offloading = offloading
        return r._consistent()
    except (ValueError, ValidationError):
        return None


def _allowed(flag: str, values: Sequence[str], field: str) -> list[str]:
    """--allow-* values checked against the recipe schema's choices."""
    choices = list(get_args(Train.model_fields[field].annotation)) if field in Train.model_fields else \
        list(get_args(Recipe.model_fields[field].annotation))
    for v in values:
        if v not in choices:
            raise FtlError(f"{flag} {v!r}: choose one of {', '.join(choices)}")
    return list(dict.fromkeys(values))


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
    allow_precisions: Sequence[str] = (),
    allow_cross_entropy: Sequence[str] = (),
    allow_activation_offloading: bool = False,
) -> tuple[list[Candidate], list[str]]:
    """Estimate every candidate; returns them (fitting or not) and the profiles skipped with why. Methods,
    precisions and cross-entropies beyond the recipe's are searched only where allowed (they change the
    numerics), and activation offloading only where allowed (it needs host RAM and link time)."""
    spec = spec or resolve_model(recipe.model)
    arch = arch or build_arch(recipe, spec)
    paths = list(cluster_paths) if cluster_paths is not None else [None] * len(clusters)
    gb = global_batch(recipe)
    methods = [recipe.method] + [m for m in _allowed("--allow-method", allow_methods, "method") if m != recipe.method]
    precisions = [recipe.train.precision] + [p for p in _allowed("--allow-precision", allow_precisions, "precision")
                                              if p != recipe.train.precision]
    ces = [recipe.train.cross_entropy] + [c for c in _allowed("--allow-cross-entropy", allow_cross_entropy, "cross_entropy")
                                          if c != recipe.train.cross_entropy]
    offloads = [recipe.train.activation_offloading] + ([True] if allow_activation_offloading
                                                       and not recipe.train.activation_offloading else [])
    mrecipes = {v: mr for v in itertools.product(methods, precisions, ces, offloads)
                if (mr := _variant_recipe(recipe, *v)) is not None}
    weight_bytes = 0 if spec.origin == "local" else arch.published_bytes  # downloaded before the first step

    if arch.probe is not None:  # a probed architecture: every variant the search tries, in one probe process
        probed.prefetch(arch, [mr.model_copy(update={"train": mr.train.model_copy(update={"gradient_checkpointing": ck})})
                               for mr in mrecipes.values() for ck in (True, False)])
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
            so_all = strategies if strategies is not None else (SINGLE_GPU_STRATEGIES if world == 1 else MULTI_GPU_STRATEGIES)
            for method, mr in mrecipes.items():
                so_list = runnable(mr, so_all)
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
    cpu_ok = cl.cpu_memory_gib is None or e.cpu_bytes_per_node <= cl.cpu_memory_gib * GiB
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
        gradient_checkpointing=r.train.gradient_checkpointing, method=r.method, precision=r.train.precision,
        cross_entropy=r.train.cross_entropy, activation_offloading=r.train.activation_offloading, fits=fits,
        peak_bytes=e.memory.peak, usable_bytes=e.usable_bytes or 0, shortfall_bytes=e.shortfall_bytes,
        cpu_bytes_per_node=e.cpu_bytes_per_node, step_time_s=e.step_time_s, train_time_s=e.total_time_s,
        setup_s=setup, total_time_s=total, price_per_gpu_hour=cl.price_per_gpu_hour,
        price_date=str(cl.price_date) if cl.price_date else None, price_age_days=cl.price_age_days(), cost_usd=cost,
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
                 "train.gradient_checkpointing", "method", "train.precision", "train.cross_entropy",
                 "train.activation_offloading")
    for s in sets:
        if s.split("=", 1)[0].strip() not in plan_keys:
            args += ["--set", s]
    vals = [c.strategy, c.offload, c.micro_batch_size, c.grad_accum, str(c.gradient_checkpointing).lower(), c.method,
            c.precision, c.cross_entropy, str(c.activation_offloading).lower()]
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


def check_caps(budget_usd: float | None, deadline_s: float | None) -> None:
    """--budget and --deadline as plan and launch take them: positive, finite, a deadline up to ten years."""
    if budget_usd is not None and not (math.isfinite(budget_usd) and budget_usd > 0):
        raise FtlError(f"--budget {budget_usd}: give a positive, finite amount of USD")
    if deadline_s is not None and not (math.isfinite(deadline_s) and 0 < deadline_s <= 366 * 86400 * 10):
        raise FtlError(f"--deadline: {deadline_s:g} s is not a deadline; give one up to ten years, e.g. 6h or 3d")


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
    allow_precisions: Sequence[str] = (),
    allow_cross_entropy: Sequence[str] = (),
    allow_activation_offloading: bool = False,
) -> PlanResult:
    """The fastest (objective="time") or cheapest ("cost") candidate that fits and meets budget and deadline."""
    if objective not in ("time", "cost"):
        raise FtlError(f"--objective {objective!r}: choose time or cost")
    check_caps(budget_usd, deadline_s)
    if budget_usd is None and recipe.budget.max_cost_usd is not None:
        budget_usd = recipe.budget.max_cost_usd
    if deadline_s is None and recipe.budget.max_hours is not None:
        deadline_s = recipe.budget.max_hours * 3600
    cands, skipped = enumerate_candidates(recipe, clusters, cluster_paths, max_gpus, allow_methods, spec, arch,
                                          allow_precisions=allow_precisions, allow_cross_entropy=allow_cross_entropy,
                                          allow_activation_offloading=allow_activation_offloading)
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


Change = tuple[str, dict[str, Any]]  # (what it does, recipe keys -> values)

SUGGESTION_MAX_CHANGES = 3  # changes combined in one suggestion
SUGGESTION_MAX_ESTIMATES = 120  # estimates one search may spend (each a few ms): `ftl estimate` stays fast


def _change_groups(r: Recipe, strategy: str, world: int) -> list[list[Change]]:
    """What could make a recipe fit, in groups of alternatives: a suggestion takes at most one change from
    each group. Micro-batch and GPU-count changes keep the global batch (grad_accum absorbs them)."""
    t, cl = r.train, r.cluster
    groups: list[list[Change]] = []
    if not t.gradient_checkpointing:
        groups.append([("gradient checkpointing", {"train.gradient_checkpointing": True})])
    smaller = [m for m in (t.micro_batch_size // 2 ** k for k in range(1, 12)) if m >= 1 and t.micro_batch_size % m == 0]
    if smaller:
        groups.append([(f"micro-batch {m}", {"train.micro_batch_size": m}) for m in dict.fromkeys(smaller)])
    if r.task == "dapt" and t.cross_entropy == "standard":
        groups.append([("chunked cross-entropy (no full logits)", {"train.cross_entropy": "chunked"}),
                       ("fused cross-entropy (Liger, CUDA)", {"train.cross_entropy": "fused"})])
    if not t.activation_offloading:
        groups.append([("activation offloading (saved activations in host RAM)", {"train.activation_offloading": True})])
    if t.precision == "bf16":
        groups.append([("bf16-pure (no fp32 master weights)", {"train.precision": "bf16-pure"})])
    if t.optimizer == "adamw":
        groups.append([("8-bit AdamW (bitsandbytes)", {"train.optimizer": "adamw_8bit"})])
    if r.method == "full":
        groups.append([("LoRA instead of full fine-tuning", {"method": "lora"}),
                       ("QLoRA instead of full fine-tuning", {"method": "qlora"})])
    elif r.method == "lora":
        groups.append([("QLoRA (4-bit NF4 base)", {"method": "qlora"})])
    parallel: list[Change] = []
    if world > 1:
        parallel += [(f"shard everything with {STRATEGY_LABEL[s]}", {"parallel.strategy": s})
                     for s in ("fsdp", "zero3") if s != strategy]
    if r.parallel.offload == "none" and r.method in ("full", "freeze"):
        parallel.append(("offload optimizer states to CPU (ZeRO)",
                         {"parallel.offload": "optimizer", "parallel.strategy": "zero3" if world > 1 else "zero2"}))
    for gpn in (2 * cl.gpus_per_node, 4 * cl.gpus_per_node):
        if gpn <= 8:
            parallel += [(f"{STRATEGY_LABEL[s]} on {gpn * cl.nodes} GPUs", {"cluster.gpus_per_node": gpn, "parallel.strategy": s})
                         for s in ("fsdp", "zero3")]
    if parallel:
        groups.append(parallel)
    return groups


def _combine(r: Recipe, changes: Sequence[Change]) -> dict[str, Any] | None:
    """The recipe keys of several changes together, grad_accum set so the global batch stays; None when
    the global batch cannot be kept (or two changes set one key differently)."""
    keys: dict[str, Any] = {}
    for _, d in changes:
        for k, v in d.items():
            if keys.get(k, v) != v:
                return None
            keys[k] = v
    t, cl = r.train, r.cluster
    mb = keys.get("train.micro_batch_size", t.micro_batch_size)
    world = keys.get("cluster.gpus_per_node", cl.gpus_per_node) * cl.nodes
    gb = t.micro_batch_size * t.grad_accum * cl.world_size
    if gb % (mb * world):
        return None
    if gb // (mb * world) != t.grad_accum:
        keys["train.grad_accum"] = gb // (mb * world)
    return keys


# the recipe keys whose changes a probed architecture measures apart (launcher/estimate/probed.py variant)
_VARIANT_KEYS = {"train.gradient_checkpointing", "train.precision", "method"}


def _prefetch_changes(r: Recipe, arch: Arch, groups: list[list[Change]]) -> None:
    """Probe, in one process, every variant the suggestions of `groups` can ask for."""
    keysets: list[dict[str, Any]] = [{}]
    for g in groups:
        options = [keys for _, keys in g if set(keys) & _VARIANT_KEYS]
        keysets += [{**k, **o} for k in keysets for o in options]
    recipes = []
    for keys in keysets:
        try:
            recipes.append(_with(r, {k: v for k, v in keys.items() if k in _VARIANT_KEYS}))
        except Exception:  # noqa: BLE001 - a combination that does not validate is never suggested
            continue
    probed.prefetch(arch, recipes)


def _with(r: Recipe, changes: dict[str, Any]) -> Recipe:
    new = r.model_copy(deep=True)
    for path, value in changes.items():
        *parents, last = path.split(".")
        node: Any = new
        for k in parents:
            node = getattr(node, k)
        setattr(node, last, value)  # validate_assignment checks the value
    return new._consistent()  # and the recipe's cross-key rules (bf16-pure under ZeRO...)


def suggestions(est: Estimate, limit: int = 4) -> list[dict[str, Any]]:
    """The sets of changes that make the recipe fit, fastest first: combinations of up to
    SUGGESTION_MAX_CHANGES changes (one per group of `_change_groups`) that fit while none of their subsets
    does, ranked by predicted step time; then the smallest catalog GPU with more memory that holds the
    recipe as it is. Each carries `sets` (the --set lines that apply it)."""
    r = est.recipe
    groups = _change_groups(r, est.strategy, est.world_size)
    if est.arch.probe is not None:
        _prefetch_changes(r, est.arch, groups)
    memo = Memo()
    spent = 0
    fitting: list[tuple[frozenset[str], dict[str, Any]]] = []
    for size in range(1, SUGGESTION_MAX_CHANGES + 1):
        for chosen_groups in itertools.combinations(range(len(groups)), size):
            for changes in itertools.product(*(groups[g] for g in chosen_groups)):
                labels = frozenset(label for label, _ in changes)
                if any(f <= labels for f, _ in fitting):
                    continue  # a subset already fits: not a minimal set
                keys = _combine(r, changes)
                if keys is None or spent >= SUGGESTION_MAX_ESTIMATES:
                    continue
                spent += 1
                try:
                    alt = _with(r, keys)
                    strategy = keys.get("parallel.strategy") or (
                        resolve_strategy(alt, est.model, est.arch) if r.parallel.strategy == "auto" else est.strategy)
                    e = estimate_arch(alt, est.model, est.arch, strategy=strategy, memo=memo)
                except Exception:  # noqa: BLE001 - a combination that does not validate is not suggested
                    continue
                if e.fits:
                    fitting.append((labels, {
                        "change": " + ".join(label for label, _ in changes), "set": keys,
                        "sets": [f"{k}={_set_value(v)}" for k, v in keys.items()],
                        "peak_bytes": e.memory.peak, "usable_bytes": e.usable_bytes, "step_time_s": e.step_time_s}))
    ranked = sorted((s for _, s in fitting), key=lambda s: (s["step_time_s"] or math.inf, len(s["set"])))
    out = ranked[:limit]
    bigger = bigger_gpu(est)
    if bigger is not None:
        out.append(bigger)
    return out


def bigger_gpu(est: Estimate) -> dict[str, Any] | None:
    """The catalog GPU with more memory that holds the recipe as it is, cheapest per GPU-hour at the shipped
    prices (a GPU with no shipped price after every priced one, smaller memory first)."""
    if est.gpu is None:
        return None
    r = est.recipe
    table = gpus()

    def price_order(k: str) -> tuple[float, int]:
        p = lowest_shipped_price(k)
        return (p[0] if p else math.inf, table[k]["memory_bytes_reported"])

    for g in sorted((k for k in table if table[k]["memory_bytes_reported"] > est.gpu.memory_bytes), key=price_order):
        e = estimate_arch(_with(r, {"cluster.gpu": g}), est.model, est.arch, strategy=est.strategy)
        if e.fits:
            p = lowest_shipped_price(g)
            where = f" (${p[0]:.2f}/GPU-hour, {p[1]})" if p else " (no shipped price)"
            return {"change": f"a GPU with more memory: {e.gpu.name}{where}", "set": {"cluster.gpu": g},
                    "sets": [f"cluster.gpu={g}"], "peak_bytes": e.memory.peak, "usable_bytes": e.usable_bytes,
                    "step_time_s": e.step_time_s, "price_per_gpu_hour": p[0] if p else None}
    return None


def _set_value(v: Any) -> str:
    """A value as --set writes it (YAML: true/false, numbers, plain strings)."""
    return str(v).lower() if isinstance(v, bool) else str(v)
