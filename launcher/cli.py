"""`ftl`: parse, call the library, render with rich. No logic beyond that lives here."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.table import Table

from launcher import __version__
from launcher.errors import FtlError

app = typer.Typer(
    name="ftl",
    help="Fine-tuning launcher: know whether a fine-tune fits, how long it takes and what it costs, then run it.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
err_console = Console(stderr=True)

SetOpt = typer.Option(None, "--set", "-s", help="Override a recipe key: --set train.micro_batch_size=4 (repeatable; cluster.* reaches the profile).")
ClusterOpt = typer.Option(None, "--cluster", "-c", help="Cluster profile YAML (overrides the recipe's 'cluster').")
GpusOpt = typer.Option(None, "--gpus-per-node", help="GPUs (or CPU processes without a GPU) per node.")
NodesOpt = typer.Option(None, "--nodes", help="Number of nodes.")


def _fail(e: Exception) -> None:
    err_console.print(f"[bold red]error:[/] {e}", highlight=False, markup=True)
    raise typer.Exit(2)


def gib(n: int | float | None) -> str:
    return "—" if n is None else f"{n / 1024**3:,.2f} GiB"


def duration(s: float | None) -> str:
    if s is None:
        return "unknown"
    if s < 120:
        return f"{s:.1f} s"
    if s < 7200:
        return f"{s / 60:.1f} min"
    if s < 3 * 86400:
        return f"{s / 3600:.2f} h"
    return f"{s / 86400:.1f} days"


def _sci(x: float) -> str:
    return f"{x:.3e}"


def render_estimate(d: dict[str, Any]) -> None:
    m, pd = d["model"], d["per_device"]
    title = (f"[bold]{d['recipe']}[/]: {m['name']} · {d['method']} · {d['task']} · "
             f"{d['strategy']} on {d['nodes']}×{d['gpus_per_node']} {d['gpu']['name'] or '(no GPU)'}")
    console.print(title)
    active = f" ({m['params_active']:,} active)" if m["params_active"] != m["params_total"] else ""
    console.print(f"parameters: {m['params_total']:,} total{active}, {m['params_trainable']:,} trainable "
                  f"({100 * m['params_trainable'] / m['params_total']:.3g}%)")

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
        t.add_row(f"  [dim]{name}[/]", f"[dim]{v:,}[/]", f"[dim]{gib(v)}[/]")
    for name, v in pd["phases"].items():
        mark = " ← peak" if name == pd["peak_phase"] else ""
        t.add_row(f"phase: {name}{mark}", f"{v:,}", gib(v))
    t.add_row("overhead (context, allocator, buffers)", f"{pd['overhead_bytes']:,}", gib(pd["overhead_bytes"]))
    t.add_row("[bold]peak[/]", f"[bold]{pd['peak_bytes']:,}[/]", f"[bold]{gib(pd['peak_bytes'])}[/]")
    console.print(t)

    g = d["gpu"]
    if d["fits"] is None:
        console.print(f"GPU: {g['source']}; fits: [yellow]unknown[/] (name a GPU with --set cluster.gpu=h100-sxm)")
    elif d["fits"]:
        console.print(f"[green]fits[/]: peak {gib(pd['peak_bytes'])} of {gib(g['usable_bytes'])} usable on {g['name']}")
    else:
        console.print(f"[red]does not fit by {gib(d['shortfall_bytes'])}[/]: peak {gib(pd['peak_bytes'])} of "
                      f"{gib(g['usable_bytes'])} usable on {g['name']}")
        if d["suggestions"]:
            console.print("changes that would make it fit:")
            for s in d["suggestions"]:
                sets = " ".join(f"--set {k}={v}" for k, v in s["set"].items())
                console.print(f"  • {s['change']}: peak {gib(s['peak_bytes'])}  [dim]{sets}[/]")
    if d["cpu_bytes_per_node"]:
        console.print(f"host RAM per node (offload): {gib(d['cpu_bytes_per_node'])}")
    console.print(f"disk: {gib(d['disk_bytes'])} (weights and the checkpoints kept)")

    c = Table(title="compute", title_justify="left", show_edge=False, show_header=False)
    c.add_column("what")
    c.add_column("value", justify="right")
    c.add_row("tokens per optimizer step", f"{d['tokens_per_step']:,}")
    c.add_row("FLOPs per step", _sci(d["flops_per_step"]))
    c.add_row("step time", duration(d["step_time_s"]))
    c.add_row("optimizer steps", "unknown" if d["steps"] is None else f"{d['steps']:,}")
    c.add_row("total time", duration(d["total_time_s"]))
    cost = d["cost_usd"]
    c.add_row("cost", "unknown" if cost is None else f"${cost:,.2f} at ${d['price_per_gpu_hour']:g}/GPU-hour")
    c.add_row("data", f"{d['data']['source']}")
    c.add_row("MFU", f"{d['assumptions']['mfu']:.2f} ({d['assumptions']['mfu_source']})")
    console.print(c)


@app.command()
def estimate(
    recipe: Path = typer.Argument(..., help="Recipe YAML (recipes/*.yaml)."),
    cluster: Optional[Path] = ClusterOpt,
    sets: Optional[list[str]] = SetOpt,
    gpus_per_node: Optional[int] = GpusOpt,
    nodes: Optional[int] = NodesOpt,
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object (bytes as integers) for scripts."),
) -> None:
    """Predict per-GPU memory, step time, total time and cost of RECIPE, without torch or downloads.

    Example: ftl estimate recipes/llama3-8b-qlora.yaml --set cluster.gpu=a100-80gb --set train.micro_batch_size=2
    """
    from launcher.estimate.estimator import estimate as run_estimate
    from launcher.recipe import load_recipe

    try:
        r = load_recipe(recipe, sets=sets, cluster=cluster, gpus_per_node=gpus_per_node, nodes=nodes)
        d = run_estimate(r).to_json()
    except FtlError as e:
        _fail(e)
    if as_json:
        sys.stdout.write(json.dumps(d, indent=2) + "\n")
    else:
        render_estimate(d)


@app.command()
def models(as_json: bool = typer.Option(False, "--json")) -> None:
    """List the built-in model catalog (architectures known without a download)."""
    from launcher.catalog import models as catalog
    from launcher.estimate.arch import arch_from_config

    rows = []
    for key, e in catalog().items():
        cfg = e["config"]
        head = "seq_cls" if cfg["model_type"] in ("bert", "distilbert") else "causal_lm"
        a = arch_from_config(cfg, head)
        rows.append({"name": key, "hub_id": e.get("hub_id"), "model_type": cfg["model_type"], "params": a.params_total,
                     "active_params": a.params_active, "layers": a.layers, "hidden": a.hidden, "vocab": a.vocab})
    if as_json:
        sys.stdout.write(json.dumps(rows, indent=2) + "\n")
        return
    t = Table(show_edge=False)
    for col in ("name", "hub id", "type", "params", "layers", "hidden", "vocab"):
        t.add_column(col, justify="right" if col in ("params", "layers", "hidden", "vocab") else "left")
    for r in rows:
        p = f"{r['params'] / 1e9:.2f} B" + (f" ({r['active_params'] / 1e9:.1f} B active)" if r["active_params"] != r["params"] else "")
        t.add_row(r["name"], r["hub_id"] or "", r["model_type"], p, str(r["layers"]), str(r["hidden"]), str(r["vocab"]))
    console.print(t)


@app.command("gpus")
def list_gpus(as_json: bool = typer.Option(False, "--json")) -> None:
    """List the GPU catalog: memory, dense TFLOPS, bandwidths, with sources."""
    from launcher.catalog import find_gpu, gpus as catalog

    rows = [find_gpu(k).__dict__ for k in catalog()]
    if as_json:
        sys.stdout.write(json.dumps(rows, indent=2) + "\n")
        return
    t = Table(show_edge=False)
    for col in ("key", "name", "memory", "bf16 TFLOPS", "HBM GB/s", "link GB/s"):
        t.add_column(col)
    for r in rows:
        t.add_row(r["key"], r["name"], gib(r["memory_bytes"]), f"{r['bf16_tflops']:g}", f"{r['memory_bandwidth_gbps']:g}",
                  f"{r['intra_node_bandwidth_gbps']:g} ({r['intra_node_link']})")
    console.print(t)


@app.command()
def version() -> None:
    """Print ftl's version."""
    console.print(__version__)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
