"""What the commands show: rich tables and text for estimates, dry runs and plans, and the plan's PNG."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from launcher.backends.rental import instance_name
from launcher.backends.slurm import submitted_script
from launcher.backends.ssh import dry_run_lines
from launcher.core.durations import format_duration as duration
from launcher.cli.human import dollars, flops, gib1, seconds
from launcher.core.errors import FtlError
from launcher.estimate.search import PlanResult
from launcher.launch import Prepared, expected
from launcher.spec.recipe import RENTED

console = Console()
err_console = Console(stderr=True)


def fail(e: Exception) -> None:
    err_console.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


def gib(n: int | float | None) -> str:
    return "—" if n is None else f"{n / 1024**3:,.2f} GiB"


GIB = 1024**3


def tenths(values: list[int], total: int) -> list[float]:
    """Round byte counts to GiB tenths that add up to the rounded total (largest remainder first)."""
    want = round(total / GIB * 10)
    exact = [v / GIB * 10 for v in values]
    down = [int(x) for x in exact]
    order = sorted(range(len(values)), key=lambda i: exact[i] - down[i], reverse=True)
    for i in order[:max(0, want - sum(down))]:
        down[i] += 1
    return [x / 10 for x in down]


def count(n: int) -> str:
    """A parameter count for people: 8.07 B, 41.9 M, 131.1 k."""
    for unit, scale in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return str(n)


def parameters_line(m: dict[str, Any]) -> str:
    """The parameter count as training logs it: adapters (LoRA) are counted in the total, said once."""
    adapter = m.get("params_adapter") or 0
    total = m["params_total"] + adapter
    parts = f" (model {count(m['params_total'])} + LoRA {count(adapter)})" if adapter else ""
    active = f", {count(m['params_active'])} active" if m["params_active"] != m["params_total"] else ""
    return (f"parameters: {count(total)} total{parts}{active}; {count(m['params_trainable'])} train "
            f"({100 * m['params_trainable'] / total:.3g}%)")


def memory_lines(pd: dict[str, Any]) -> list[tuple[str, int]]:
    """The peak as its main parts (they add up to it): the states, what the peak phase adds, the overhead."""
    states = [("weights", pd["weights_bytes"]), ("gradients", pd["gradients_bytes"]),
              ("optimizer states", pd["optimizer_bytes"])]
    rest = pd["peak_allocated_bytes"] - sum(v for _, v in states)
    if rest < 0:  # the peak phase holds less than every state (cannot be shown as parts)
        return []
    return [*states, (f"working memory ({pd['peak_phase']})", rest),
            ("overhead (context, allocator)", pd["overhead_bytes"])]


def render_estimate(d: dict[str, Any], detail: bool = False) -> None:
    """The short view (model, method, per-GPU peak and its main parts, fits, time, cost) in 80 columns;
    detail: every memory line and phase, FLOPs, data and MFU."""
    m, pd, g = d["model"], d["per_device"], d["gpu"]
    name = Path(m["name"]).name if m["name"].startswith(("/", ".")) else m["name"]  # a local folder: its name
    console.print(f"[bold]{escape(d['recipe'])}[/]: {escape(name)} · {d['method']} · {d['task']} · "
                  f"{d['strategy']} on {d['nodes']}×{d['gpus_per_node']} {escape(g['name'] or '(no GPU)')}",
                  highlight=False)
    console.print(parameters_line(m), highlight=False)
    parts = memory_lines(pd)
    if detail or not parts:
        _memory_detail(pd)
    else:
        t = Table(box=None, show_header=False, pad_edge=False, title="memory per GPU (GiB)", title_justify="left")
        t.add_column("what")
        t.add_column("GiB", justify="right")
        shown = tenths([v for _, v in parts], pd["peak_bytes"])
        for (name, _), v in zip(parts, shown):
            t.add_row(f"  {name}", f"{v:.1f}")
        t.add_row("  [bold]peak[/]", f"[bold]{sum(shown):.1f}[/]")
        console.print(t)
    if d["fits"] is None:
        console.print(f"fits: [yellow]unknown[/], {escape(g['source'])} (name one: --set cluster.gpu=h100-sxm)",
                      highlight=False)
    elif d["fits"]:
        console.print(f"[green]fits[/]: peak {gib1(pd['peak_bytes'])} of {gib1(g['usable_bytes'])} usable", highlight=False)
    else:
        console.print(f"[red]does not fit by {gib1(d['shortfall_bytes'])}[/]: peak {gib1(pd['peak_bytes'])} of "
                      f"{gib1(g['usable_bytes'])} usable", highlight=False)
        if d["suggestions"]:
            console.print("changes that would make it fit:")
            for s in d["suggestions"]:
                sets = " ".join(f"--set {kv}" for kv in s["sets"])
                console.print(f"  • {escape(s['change'])}: peak {gib1(s['peak_bytes'])}\n    [dim]{escape(sets)}[/]",
                              highlight=False)
    if d["cpu_bytes_per_node"]:
        console.print(f"host RAM per node (offload): {gib1(d['cpu_bytes_per_node'])}")
    steps = "unknown steps" if d["steps"] is None else f"{d['steps']:,} steps"
    cost, price = d["cost_usd"], d["price_per_gpu_hour"]
    if d["step_time_s"] is None:
        console.print(f"time: unknown without a GPU ({steps})", highlight=False)
    else:
        console.print(f"time: {seconds(d['step_time_s'])} a step × {steps} = {seconds(d['total_time_s'])}", highlight=False)
    if cost is not None:
        console.print("cost: no price (set cluster.price_per_gpu_hour)" if not price else
                      f"cost: {dollars(cost)} at ${price:g}/GPU-hour", highlight=False)
    if detail:
        c = Table(title="compute", title_justify="left", show_edge=False, show_header=False)
        c.add_column("what")
        c.add_column("value")
        c.add_row("parameters", f"{m['params_total']:,} in the model + {m.get('params_adapter') or 0:,} adapter; "
                                f"{m['params_trainable']:,} train")
        c.add_row("tokens per optimizer step", f"{d['tokens_per_step']:,}")
        c.add_row("FLOPs per step", flops(d["flops_per_step"]))
        c.add_row("data", escape(f"{d['data']['source']}"))
        c.add_row("MFU", escape(f"{d['assumptions']['mfu']:.2f} ({d['assumptions']['mfu_source']})"))
        c.add_row("disk", f"{gib1(d['disk_bytes'])} (weights and the checkpoints kept)")
        console.print(c)
    else:
        console.print("[dim]ftl estimate --detail: every memory line and phase, FLOPs, disk, data, MFU[/]")
    if d.get("price_note") and cost is not None:
        console.print(f"[yellow]{escape(d['price_note'])}[/]", soft_wrap=True)


def _memory_detail(pd: dict[str, Any]) -> None:
    """Every memory line: the components, their detail, each phase's allocation (the peak phase marked)."""
    t = Table(title="memory per device", title_justify="left", show_edge=False)
    t.add_column("what")
    t.add_column("bytes", justify="right")
    t.add_column("GiB", justify="right")
    lines = [
        ("weights", pd["weights_bytes"]),
        ("gradients", pd["gradients_bytes"]),
        ("optimizer states", pd["optimizer_bytes"]),
        ("activations (saved for backward)", pd["activations_bytes"]),
        ("logits and loss", pd["logits_bytes"]),
        ("backward workspace", pd["backward_transient_bytes"]),
        ("optimizer-step temporaries", pd["optimizer_step_temp_bytes"]),
    ]
    for name, v in lines:
        t.add_row(name, f"{v:,}", gib(v))
    for name, v in pd["detail"].items():
        t.add_row(f"  [dim]{escape(name)}[/]", f"[dim]{v:,}[/]", f"[dim]{gib(v)}[/]")
    for name, v in pd["phases"].items():
        mark = " ← peak" if name == pd["peak_phase"] else ""
        t.add_row(f"phase: {name}{mark}", f"{v:,}", gib(v))
    t.add_row("overhead (context, allocator, buffers)", f"{pd['overhead_bytes']:,}", gib(pd["overhead_bytes"]))
    t.add_row("[bold]peak[/] (the peak phase + overhead)", f"[bold]{pd['peak_bytes']:,}[/]",
              f"[bold]{gib(pd['peak_bytes'])}[/]")
    console.print(t)


def render_env(d: dict[str, Any]) -> None:
    """`ftl env` as plain `name: value` lines, the form that pastes well into a bug report."""
    t = d["torch"]
    if not t.get("installed"):
        build = "not installed"
    elif t.get("error") and "cuda" not in t:
        build = f"cannot be imported ({t['error']})"
    else:
        build = (f"ROCm {t['hip']}" if t.get("hip") else f"CUDA {t['cuda']}" if t.get("cuda") else "CPU build") + (
            f"; {len(t['gpus'])} GPU(s) visible" if t.get("cuda_available") else "; no GPU visible")
        if t.get("error"):
            build += f" ({t['error']})"
    gpus = [f"{g['name']} ({gib(g['memory_bytes'])})" for g in t.get("gpus") or []] or [
        f"{g['name']} ({g['memory']})" for g in d["nvidia"]["gpus"]]
    lines = [("ftl", d["ftl"]), ("python", f"{d['python']} ({d['python_executable']})"), ("platform", d["platform"])]
    lines += [(name, v) for name, v in d["packages"].items()]
    lines += [("torch build", build), ("nccl", t.get("nccl") or "—"),
              ("bitsandbytes backend", d["bitsandbytes_backend"] or "—"),
              ("nvidia driver", d["nvidia"]["driver"] or d["nvidia"].get("error") or "no nvidia-smi"),
              ("gpus", ", ".join(gpus) or "none")]
    lines += [(tool, path or "not found") for tool, path in d["tools"].items()]
    lines += [(name, state) for name, state in d["keys"].items()]
    width = max(len(k) for k, _ in lines)
    for k, v in lines:
        console.print(f"{k + ':':<{width + 1}} {v}", markup=False, highlight=False, soft_wrap=True)


def launch_summary(p: Prepared) -> dict[str, Any]:
    r, plan = p.recipe, p.plan
    e = plan.estimate or {}
    pd = e.get("per_device") or {}
    return {
        "run_id": p.run.id,
        "run_dir": str(p.run.dir),
        "recipe": r.name,
        "model": r.model,
        "method": r.method,
        "task": r.task,
        "data": r.data.path,
        "strategy": plan.strategy,
        "device": plan.device,
        "world_size": plan.world_size,
        "nodes": plan.nodes,
        "gpus_per_node": plan.gpus_per_node,
        "precision": r.train.precision,
        "micro_batch_size": r.train.micro_batch_size,
        "grad_accum": r.train.grad_accum,
        "global_batch": r.train.micro_batch_size * r.train.grad_accum * plan.world_size,
        "max_steps": r.train.max_steps,
        "epochs": r.train.epochs,
        "resume_from": str(p.resume_from) if p.resume_from else None,
        "peak_bytes": pd.get("peak_bytes"),
        "fits": e.get("fits"),
        "steps": e.get("steps"),
        "step_time_s": e.get("step_time_s"),
        "warnings": p.warnings or [],
    }


def _estimate_line(s: dict[str, Any]) -> str:
    if s["peak_bytes"] is None:
        return "estimate: (recorded in plan.json at the first launch)"
    fits = {True: "[green]fits[/]", False: "[red]does not fit[/]", None: "fits: unknown (no GPU)"}[s["fits"]]
    steps = "unknown" if s["steps"] is None else f"{s['steps']:,}"
    return (f"estimate: peak {gib(s['peak_bytes'])} per device, {fits}; {steps} optimizer steps, "
            f"step time {duration(s['step_time_s'])}")


def _show_plain(title: str, text: str) -> None:
    console.print(f"[bold]{title}[/]")
    console.print(text.rstrip("\n"), markup=False, highlight=False, soft_wrap=True)


def render_dry_run(p: Prepared) -> None:
    s = launch_summary(p)
    console.print(f"[bold]{escape(s['recipe'])}[/]: {escape(s['model'])} · {s['method']} · {s['task']} · data {escape(str(s['data']))}",
                  highlight=False, soft_wrap=True)
    console.print(f"{s['strategy']} · {s['world_size']} process(es) on {s['device']} ({s['nodes']} node × "
                  f"{s['gpus_per_node']}) · {s['precision']} · micro-batch {s['micro_batch_size']} × grad-accum "
                  f"{s['grad_accum']} × {s['world_size']} = global batch {s['global_batch']}"
                  + (f" · max_steps {s['max_steps']}" if s["max_steps"] else f" · epochs {s['epochs']:g}"),
                  highlight=False, soft_wrap=True)
    console.print(_estimate_line(s), soft_wrap=True)
    for w in s["warnings"]:
        console.print(f"[yellow]warning:[/] {escape(w)}", highlight=False, soft_wrap=True)
    for name in ("accelerate.yaml", "deepspeed.json", "command.sh"):
        if name in p.files:
            _show_plain(name, p.files[name])
    provider = p.recipe.cluster.provider
    if provider == "slurm":

        _show_plain("sbatch script (submitted through submitit; one task per node runs launcher.agent.node)",
                    submitted_script(p.run, p.recipe, p.plan.device))
    elif provider == "ssh":

        _show_plain("per host, over SSH", dry_run_lines(p.run, p.recipe))
    elif provider in RENTED and p.resume_from is None:

        cl = p.recipe.cluster
        secs, usd = expected(p)
        names = ", ".join(instance_name(p.run.id, k) for k in range(cl.nodes))
        _show_plain("would rent (the offer is chosen at launch: cheapest available)",
                    f"{cl.nodes} × {cl.gpus_per_node} {cl.gpu} on {provider} at ${cl.price_per_gpu_hour:g}/GPU-hour, "
                    f"named {names}\n"
                    + ("expected: unknown time and cost (no step time for this GPU)" if secs is None else
                       f"expected: {duration(secs)}, ${usd:,.2f} (instance boot and weight download included)")
                    + f"\neach instance: {cl.python or 'python3'} -m launcher.agent in <workdir>/runs/{p.run.id}, "
                    "then results fetched back and the instance terminated")
    _show_plain("environment set for the launch", "\n".join(f"{k}={v}" for k, v in p.spec.env.items()) or "(none)")
    if p.spec.unset:
        _show_plain("removed from the inherited environment", " ".join(p.spec.unset))
    verb = "would continue in" if p.resume_from else "would create"
    console.print(f"dry run: {verb} {s['run_dir']}" + (f" from {s['resume_from']}" if s["resume_from"] else "")
                  + "; nothing was started or written", highlight=False, markup=False, soft_wrap=True)


PLOT_SIZE_PX = (1000, 600)  # width, height of the PNG --plot writes
PLOT_DPI = 100


PLOT_MARK = ("Software", "ftl plan")  # PNG text chunk that marks a plot as ftl's own (it may be replaced)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def check_plot_path(path: str | Path, overwrite: bool = False) -> Path:
    """Where --plot may write, checked before any work: an existing folder, and no file there that ftl did not
    write (a PNG carrying PLOT_MARK) unless --overwrite."""
    path = Path(path)
    if path.is_dir():
        raise FtlError(f"--plot {path}: is a folder; give a file name such as {path / 'plan.png'}")
    if not path.parent.is_dir():
        raise FtlError(f"--plot {path}: the folder {path.parent} does not exist; create it or pick another path")
    if path.exists() and not overwrite and not _is_ftl_plot(path):
        raise FtlError(f"--plot {path}: the file exists and is not a plot ftl wrote; pick another path or pass --overwrite")
    return path


def _is_ftl_plot(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
    except OSError:
        return False
    key, value = PLOT_MARK
    return head.startswith(PNG_SIGNATURE) and b"tEXt" + key.encode() + b"\x00" + value.encode() in head


def write_plot(res: PlanResult, path: str | Path, overwrite: bool = False) -> Path:
    """A PNG scatter of total time vs cost of the fitting candidates, the Pareto frontier as a line
    with labels, and the chosen plan circled. matplotlib (Agg) is imported only here."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise FtlError("--plot needs matplotlib: pip install matplotlib") from None
    path = check_plot_path(path, overwrite)
    fit = res.fitting
    fig, ax = plt.subplots(figsize=(PLOT_SIZE_PX[0] / PLOT_DPI, PLOT_SIZE_PX[1] / PLOT_DPI), dpi=PLOT_DPI)
    try:
        profiles = sorted({c.profile for c in fit})
        for i, prof in enumerate(profiles):
            pts = [c for c in fit if c.profile == prof]
            ax.scatter([c.total_time_s / 3600 for c in pts], [c.cost_usd for c in pts], s=12, alpha=0.5,
                       label=prof, color=plt.cm.tab10(i % 10))
        front = res.frontier
        ax.plot([c.total_time_s / 3600 for c in front], [c.cost_usd for c in front], "-o", color="black",
                lw=1.2, ms=4, label="Pareto frontier")
        for c in front:
            ax.annotate(f"{c.label}\n{c.profile}", (c.total_time_s / 3600, c.cost_usd), fontsize=7,
                        xytext=(4, 4), textcoords="offset points")
        ch = res.chosen
        ax.scatter([ch.total_time_s / 3600], [ch.cost_usd], s=160, facecolors="none", edgecolors="red", lw=1.5,
                   label=f"chosen ({res.objective})")
        ax.set_xscale("log")
        ax.set_xlabel("total time (hours, log scale)")
        ax.set_ylabel("total cost (USD)")
        ax.set_title(f"{res.recipe.name}: {len(fit)} fitting candidates")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7, loc="upper right")
        # a temporary file beside the target, renamed over it: a reader never sees half a PNG
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                fig.savefig(f, dpi=PLOT_DPI, format="png", metadata={PLOT_MARK[0]: PLOT_MARK[1]})
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    finally:
        plt.close(fig)
    return path


def render_preview(d: dict[str, Any], color: bool) -> None:
    """ftl preview: each example with its trained tokens marked, then the statistics."""
    for i, ex in enumerate(d["examples"], 1):
        head = f"example {i}: {ex['tokens']:,} tokens"
        if ex["truncated_tokens"]:
            head += f", {ex['truncated_tokens']:,} cut by max_seq_len"
        if ex.get("label") is not None:
            head += f", label {ex['label']}"
        console.rule(head, style="dim") if color else console.print(f"--- {head} ---", markup=False, highlight=False)
        if color:
            text = Text()
            for seg in ex["segments"]:
                text.append(seg["text"], style="bold green" if seg["trains"] else "dim")
            console.print(text, soft_wrap=True)
        else:
            console.print("".join(f"[[{s['text']}]]" if s["trains"] else s["text"] for s in ex["segments"]),
                          markup=False, highlight=False, soft_wrap=True)
    st = d["stats"]
    lines = [f"{d['kind']} data: {st['examples']:,} training examples, {st['held_out']:,} held out ({st['data']})"]
    if st.get("tokens_total") is not None:
        lines.append(f"tokens per example: min {st['tokens_min']:,}, median {st['tokens_median']:,.0f}, "
                     f"p95 {st['tokens_p95']:,}, max {st['tokens_max']:,} ({st['tokens_total']:,} in all)")
        lines.append(f"longer than max_seq_len {st['max_seq_len']:,}: {st['over_max_seq_len']:,} (truncated)")
    if "packing_efficiency" in st:
        lines.append(f"packing: {st['packing_efficiency']:.1%} of each packed row holds tokens")
    if not color:
        lines.append("[[...]]: tokens that carry the loss")
    for line in lines:
        console.print(line, markup=False, highlight=False, soft_wrap=True)
