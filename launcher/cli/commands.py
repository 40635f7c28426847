"""The `ftl` commands: parse, call the library, render (launcher.cli.views). No logic beyond that lives here."""

from __future__ import annotations

import datetime as dt
import importlib
import inspect
import json
import re
import sys
from pathlib import Path
from typing import Any, Optional

import typer
from rich import box
from typer.core import TyperGroup
from rich.markup import escape
from rich.table import Table

from launcher import __version__
from launcher.backends import get_backend
from launcher.backends.rental import fleet
from launcher.backends.slurm import export_sbatch, path_for_export
from launcher.cloud import prices as P
from launcher.core.durations import format_duration as duration
from launcher.core.durations import parse_duration
from launcher.core.errors import FtlError
from launcher.core.files import write_atomic
from launcher.core.procs import signal_words
from launcher.estimate import probed
from launcher.estimate.arch import SUPPORTED, arch_from_config
from launcher.estimate.search import check_caps
from launcher.estimate.search import estimate as run_estimate
from launcher.estimate.search import plan as run_plan
from launcher.launch import (check_estimate_data, expected, prepare_launch, prepare_resume, render_files, run_status,
                             write_run)
from launcher.rundir import find_run, list_runs, newest_run, runs_root
from launcher.rundir.cost import report
from launcher.rundir.progress import RunProgress, run_progress
from launcher.spec.catalog import find_gpu, provider_facts
from launcher.spec.catalog import gpus as catalog_gpus
from launcher.spec.catalog import models as catalog_models
from launcher.spec.axolotl import import_axolotl, read_axolotl
from launcher.spec.examples import DEFAULT_EXAMPLE, examples, init_example
from launcher.spec.recipe import RENTED, load_profiles, load_recipe
from launcher.cli.environment import environment
from launcher.cli.human import clock, dollars, gpu_hours, seconds, sig4, when
from launcher.cli.live import LiveView
from launcher.cli.quiet import libraries_to
from launcher.cli.views import (fail, launch_summary, console, err_console, gib, render_dry_run, render_env,
                                render_estimate, render_preview, write_plot, check_plot_path)

# an architecture without an analytic builder is probed once (seconds): say so while it runs
probed.on_probe = lambda line: err_console.print(f"[dim]{escape(line)}[/dim]")

# what help shows after an option instead of a Python type (<bool>, <list[Path]>): nothing after a flag
METAVARS = {"int": "N", "float": "NUMBER", "Path": "PATH", "str": "TEXT", "bool": ""}


def _plain_metavars(cmd: Any, ctx: Any) -> None:
    """Name each parameter's value the way a shell user reads it (RECIPE, N, PATH; nothing after a flag)."""
    help_opt = cmd.get_help_option(ctx)
    for p in [*cmd.params, *([help_opt] if help_opt is not None else [])]:
        if p.metavar is not None:
            continue
        if p.param_type_name == "argument":
            p.metavar = p.name.upper()
            p.display_type_rich = lambda ctx: None  # the name (RECIPE, RUN) says it; typer would add <path>
        else:  # a repeatable option (list[...]) says so in its help
            p.metavar = METAVARS.get(p.bare_type().removeprefix("list[").removesuffix("]"), "TEXT")


def _reflowed(text: str) -> str:
    """A help text whose prose lines are joined, so the terminal wraps them (typer keeps a docstring's line
    breaks after the first paragraph); indented lines (examples) and the line after a ':' keep their own."""
    out: list[str] = []
    for line in inspect.cleandoc(text).split("\n"):
        if out and out[-1] and line and not line[0].isspace() and not out[-1].endswith(":"):
            out[-1] += " " + line
        else:
            out.append(line)
    return "\n".join(out)


class _OneLineErrors(TyperGroup):
    """A bad flag value, an unknown option or a missing argument reads as one line, like every other ftl
    error (`error: ...`, exit 2), instead of a usage panel."""

    def get_command(self, ctx, cmd_name):  # type: ignore[override]
        cmd = super().get_command(ctx, cmd_name)
        if cmd is not None:
            _plain_metavars(cmd, ctx)
            cmd.help = _reflowed(cmd.help or "")
        return cmd

    def get_params(self, ctx):  # type: ignore[override]
        _plain_metavars(self, ctx)
        return super().get_params(ctx)

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):  # type: ignore[override]
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except typer.Abort:
            err_console.print("aborted")
            sys.exit(1)
        except typer.TyperException as e:  # typer's (vendored click's) usage errors
            if type(e).__name__ == "NoArgsIsHelpError":
                e.show()  # type: ignore[attr-defined]  # `ftl` alone prints the help
                sys.exit(e.exit_code)  # type: ignore[attr-defined]
            ctx = getattr(e, "ctx", None)
            hint = f" (see `{ctx.command_path} --help`)" if ctx is not None else ""
            err_console.print(f"[bold red]error:[/] {escape(e.format_message())}{hint}", highlight=False, soft_wrap=True)  # type: ignore[attr-defined]
            sys.exit(e.exit_code)  # type: ignore[attr-defined]
        sys.exit(rv if isinstance(rv, int) else 0)


app = typer.Typer(
    name="ftl",
    cls=_OneLineErrors,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _print_version(value: bool) -> None:
    if value:
        console.print(__version__, highlight=False)
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", is_eager=True, callback=_print_version,
                                 help="Print ftl's version and exit."),
) -> None:
    """Fine-tuning launcher: know whether a fine-tune fits, how long it takes and what it costs, then run it.

    New here? ftl init quickstart (copies a recipe into this folder), then ftl launch quickstart.yaml.
    """


SetOpt = typer.Option(None, "--set", "-s", help="Override a recipe key: --set train.micro_batch_size=4 (repeatable; cluster.* reaches the profile).")
ClusterOpt = typer.Option(None, "--cluster", "-c", help="Cluster profile YAML (overrides the recipe's 'cluster').")
GpusOpt = typer.Option(None, "--gpus-per-node", help="GPUs (or CPU processes without a GPU) per node.")
NodesOpt = typer.Option(None, "--nodes", help="Number of nodes.")
VerboseOpt = typer.Option(False, "--verbose", "-v", help="On a terminal, also show the libraries' output (warnings, "
                          "notices) above the progress bar; it is always in the run's log.")
LIVE_PROVIDERS = ("local", "slurm")  # their run directory (metrics.jsonl, the log) is readable here while they run


@app.command()
def estimate(
    recipe: Path = typer.Argument(..., help="Recipe YAML (recipes/*.yaml)."),
    cluster: Optional[Path] = ClusterOpt,
    sets: Optional[list[str]] = SetOpt,
    gpus_per_node: Optional[int] = GpusOpt,
    nodes: Optional[int] = NodesOpt,
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object (bytes as integers) for scripts."),
    detail: bool = typer.Option(False, "--detail", help="Show every memory line and phase, FLOPs, disk, data and MFU."),
) -> None:
    """Predict per-GPU memory, step time, total time and cost of RECIPE, without torch or downloads.

    Example: ftl estimate recipes/llama3-8b-qlora.yaml --set cluster.gpu=a100-80gb --set train.micro_batch_size=2
    """

    try:
        r = load_recipe(recipe, sets=sets, cluster=cluster, gpus_per_node=gpus_per_node, nodes=nodes)
        warnings = check_estimate_data(r)
        d = {**run_estimate(r).to_json(), "warnings": warnings}
    except FtlError as e:
        fail(e)
    for w in warnings:
        err_console.print(f"[yellow]warning:[/] {escape(w)}", highlight=False, soft_wrap=True)
    if as_json:
        sys.stdout.write(json.dumps(d, indent=2) + "\n")
    else:
        render_estimate(d, detail=detail)


@app.command()
def init(
    example: str = typer.Argument(DEFAULT_EXAMPLE, help="A shipped recipe to start from (ftl init --list)."),
    list_examples: bool = typer.Option(False, "--list", help="List the examples, one line each."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace files of the same name in this folder."),
) -> None:
    """Copy a shipped recipe (and the cluster profile it names) into this folder, to edit there.

    The copy's paths point at the shipped model and data, so you edit your copy and never the package's.
    No file that exists is replaced (--overwrite allows it).

    Example: ftl init quickstart
    """
    if list_examples:
        known = examples()
        width = max((len(n) for n in known), default=0)
        for name, ex in known.items():
            console.print(f"{name:<{width}}  {ex.summary}", markup=False, highlight=False, soft_wrap=True)
        return
    try:
        written = init_example(example, overwrite=overwrite)
    except FtlError as e:
        fail(e)
    for p in written:
        err_console.print(f"wrote {escape(str(p))}", highlight=False)
    recipe = written[0].name
    err_console.print(f"next: ftl estimate {escape(recipe)}, then ftl launch {escape(recipe)} --dry-run "
                      "(edit the copy; `ftl launch` it when the dry run looks right)", highlight=False, soft_wrap=True)


@app.command()
def models(as_json: bool = typer.Option(False, "--json", help="Print JSON for scripts.")) -> None:
    """List the built-in model catalog (architectures known without a download)."""

    rows = []
    for key, e in catalog_models().items():
        cfg = e["config"]
        head = "seq_cls" if cfg["model_type"] in ("bert", "distilbert") else "causal_lm"
        # a family without an analytic builder is counted from the model itself (probed once, then cached)
        a = arch_from_config(cfg, head) if cfg["model_type"] in SUPPORTED else probed.probe_arch(cfg, head, 2)
        rows.append({"name": key, "hub_id": e.get("hub_id"), "model_type": cfg["model_type"], "params": a.params_total,
                     "active_params": a.params_active, "layers": a.layers, "hidden": a.hidden, "vocab": a.vocab})
    if as_json:
        sys.stdout.write(json.dumps(rows, indent=2) + "\n")
        return
    # names are typed into recipes: never cut (llama-3.1-8b/70b/405b differ at the end); the hub id folds
    t = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
    t.add_column("name", no_wrap=True, min_width=max(len(r["name"]) for r in rows))
    t.add_column("hub id", overflow="fold")
    for col in ("type", "params", "active", "layers"):  # hidden size and vocabulary: --json
        t.add_column(col, justify="left" if col == "type" else "right", no_wrap=True)
    for r in rows:
        active = f"{r['active_params'] / 1e9:.1f} B" if r["active_params"] != r["params"] else ""
        t.add_row(r["name"], r["hub_id"] or "", r["model_type"], f"{r['params'] / 1e9:.2f} B", active, str(r["layers"]))
    console.print(t)


@app.command("gpus")
def list_gpus(as_json: bool = typer.Option(False, "--json", help="Print JSON for scripts.")) -> None:
    """List the GPU catalog: memory, dense TFLOPS, bandwidths, with sources."""

    rows = [find_gpu(k).__dict__ for k in catalog_gpus()]
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


# ---------------------------------------------------------------------------------------------
# launching and runs


@app.command()
def launch(
    recipe: Optional[Path] = typer.Argument(None, help="Recipe YAML (omit with --resume)."),
    cluster: Optional[Path] = ClusterOpt,
    nodes: Optional[int] = NodesOpt,
    gpus_per_node: Optional[int] = GpusOpt,
    sets: Optional[list[str]] = SetOpt,
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the plan, configs, command and run dir; start and write nothing."),
    force: bool = typer.Option(False, "--force", help="Launch even if the estimate says it does not fit."),
    resume: Optional[str] = typer.Option(None, "--resume", help="Continue RUN (an id or run dir) from its newest complete checkpoint."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON (the dry-run plan, or the final state) instead of text."),
    export: Optional[Path] = typer.Option(None, "--export", help="SLURM profiles: prepare the run directory and write a "
                                          "standalone sbatch script to this file instead of submitting."),
    detach: bool = typer.Option(False, "--detach", help="SLURM profiles: submit and return at once (follow with "
                                "ftl status / ftl logs -f RUN; stop with ftl cancel RUN)."),
    yes: bool = typer.Option(False, "--yes", "-y", help="Rented GPUs (runpod, lambda): rent without asking to confirm "
                             "the expected cost and time."),
    budget: Optional[float] = typer.Option(None, "--budget", help="Rented GPUs: most USD to spend (default: "
                                           "budget.max_cost_usd); at the cap the run saves a checkpoint and the "
                                           "instances are terminated."),
    deadline: Optional[str] = typer.Option(None, "--deadline", help="Rented GPUs: longest the instances may run, boot "
                                           "included: 6h, 90m, 2d (default: budget.max_hours)."),
    verbose: bool = VerboseOpt,
) -> None:
    """Check, plan and run RECIPE; the run lives in runs/<run id>/.

    Where it runs is the cluster profile's provider: local (this machine), slurm (submitted through
    submitit, one task per node; Ctrl-C stops following, the job keeps running), ssh (one launch per
    host over SSH, detached from the connection).

    Examples (in the folder ftl ships in; ftl init copies a recipe to yours):
      ftl launch recipes/quickstart.yaml
      ftl launch recipes/smoke.yaml --gpus-per-node 2 --set parallel.strategy=zero3
      ftl launch recipes/smoke.yaml --cluster cluster/h100-2x8-ib.yaml --nodes 2 --dry-run
      ftl launch recipes/smoke.yaml --cluster cluster/h100-2x8-ib.yaml --nodes 2 --export job.sbatch
      ftl launch recipes/smoke.yaml --cluster cluster/ssh-2-hosts.yaml --nodes 2 --dry-run
      ftl launch recipes/smoke.yaml --cluster cluster/runpod-a100-80gb.yaml --budget 5 --deadline 2h
    """

    try:
        if resume is not None:
            if recipe is not None or sets or cluster or nodes:
                raise FtlError("--resume continues a run with the recipe and plan it recorded; drop RECIPE, --set, "
                               "--cluster and --nodes (start a new run to change them; --gpus-per-node may change "
                               "for DDP runs)")
            p = prepare_resume(resume, gpus_per_node=gpus_per_node)
        else:
            if recipe is None:
                raise FtlError("give a recipe (ftl launch recipes/smoke.yaml) or --resume RUN")
            r = load_recipe(recipe, sets=sets, cluster=cluster, gpus_per_node=gpus_per_node, nodes=nodes)
            p = prepare_launch(r, force=force)
        # the caps are checked before anything runs, dry runs included
        check_caps(budget, parse_duration(deadline) if deadline else None)
        if (budget is not None or deadline is not None) and p.recipe.cluster.provider not in RENTED:
            raise FtlError("--budget and --deadline guard rented GPUs (a runpod or lambda cluster profile)")
        render_files(p)
        if dry_run:
            missing = fleet.key_problem(p.recipe.cluster.provider) if p.recipe.cluster.provider in RENTED else None
            if missing:
                p.warnings = [*(p.warnings or []), missing]
            if as_json:
                out = {"dry_run": True, **launch_summary(p), "plan": p.plan.to_json(), "files": p.files,
                       "command": p.spec.argv, "env": p.spec.env, "unset": p.spec.unset}
                sys.stdout.write(json.dumps(out, indent=2, default=str) + "\n")
            else:
                render_dry_run(p)
            return
        if export is not None:
            _export(p, export, as_json)
            return
        if detach and p.recipe.cluster.provider != "slurm":
            raise FtlError(f"--detach leaves the run to the job scheduler: it needs a SLURM profile (cluster.provider is "
                           f"{p.recipe.cluster.provider!r})")
        live = not as_json and not detach and p.recipe.cluster.provider in LIVE_PROVIDERS and console.is_terminal
        backend = get_backend(p.recipe.cluster.provider, echo=not as_json and not live)
        backend.check()
        if not as_json:
            for w in p.warnings or []:
                err_console.print(f"[yellow]warning:[/] {escape(w)}", highlight=False, soft_wrap=True)
        if p.recipe.cluster.provider in RENTED:
            _confirm_rental(p, backend, yes, budget, deadline)
        run = write_run(p)
        if not as_json:
            verb = f"resuming {run.id} from {p.resume_from.name}" if p.resume_from else f"run {run.id}"
            where = "" if p.plan.nodes == 1 else f" ({p.plan.nodes} nodes × {p.plan.gpus_per_node})"
            err_console.print(f"[bold]{verb}[/]: {p.plan.strategy} · {p.plan.world_size} process(es){where} on "
                              f"{p.plan.device} · {p.recipe.cluster.provider} · log {escape(str(run.log_path))}",
                              highlight=False, soft_wrap=True)
        handle = backend.launch(run, resume_from=str(p.resume_from) if p.resume_from else None, spec=p.spec, secrets=p.secrets)
        if detach:
            if as_json:
                sys.stdout.write(json.dumps(run.state(), indent=2) + "\n")
            else:
                err_console.print(f"run {run.id} submitted; follow it with: ftl logs -f {run.id}", highlight=False)
            return
        if live:
            with LiveView(run, backend.log_path(run), console, verbose=verbose) as view:
                status = backend.wait(handle)
            if status == "failed" and view.failed_tail():
                err_console.print(f"[dim]last lines of {escape(str(backend.log_path(run)))}:[/]", highlight=False)
                err_console.print("\n".join(view.failed_tail()), highlight=False, markup=False, soft_wrap=True)
        else:
            status = backend.wait(handle)
    except FtlError as e:
        fail(e)
    except KeyboardInterrupt:  # before the run started (afterwards wait() forwards Ctrl-C to it)
        err_console.print("interrupted", highlight=False)
        raise typer.Exit(130)
    st = run.state()
    if as_json:
        sys.stdout.write(json.dumps(st, indent=2) + "\n")
    if status == "running":  # a scheduler job we stopped following
        return
    if status == "completed":
        if not as_json:
            ckpt = run.newest_checkpoint()
            err_console.print(f"[green]run {run.id} completed[/]: {escape(str(run.dir))}"
                              + (f" (last checkpoint {ckpt.name})" if ckpt else ""), highlight=False, soft_wrap=True)
        return
    if status == "stopped":
        ckpt = run.newest_checkpoint()
        sig = getattr(handle, "stop_signal", None)
        err_console.print(f"[yellow]run {run.id} stopped[/]" + (f" ({signal_words(sig)})" if sig else "") + "; "
                          + (f"continue it with: ftl launch --resume {run.id}" if ckpt else "it left no complete checkpoint"),
                          highlight=False, soft_wrap=True)  # a command to copy: never folded mid-line
        raise typer.Exit(128 + int(sig or 15))
    why = st.get("error") or f"exit code {st.get('returncode')}; log: {run.log_path}"
    fail(FtlError(f"run {run.id} failed: {why}"))


def _confirm_rental(p, backend, yes: bool, budget: Optional[float], deadline: Optional[str]) -> None:
    """Show what the rental is expected to take and cost (boot and download included); ask unless --yes."""

    backend.budget_usd = budget
    backend.deadline_s = parse_duration(deadline) if deadline else None
    usd_cap, secs_cap = backend.limits(p.recipe)
    cl = p.recipe.cluster
    secs, usd = expected(p)
    what = f"{cl.nodes} × {cl.gpus_per_node} {cl.gpu or 'GPU'} on {cl.provider} at ${cl.price_per_gpu_hour:g}/GPU-hour"
    exp = ("expected: unknown time and cost (the estimate has no step time for this GPU)" if secs is None else
           f"expected: {duration(secs)}, ${usd:,.2f} (instance boot and weight download included)")
    caps = ", ".join(x for x in (f"${usd_cap:,.2f}" if usd_cap is not None else "",
                                 duration(secs_cap) if secs_cap is not None else "") if x) or "none (set --budget)"
    err_console.print(f"[bold]rent[/] {escape(what)}\n{exp}\nbudget cap: {caps}", highlight=False, soft_wrap=True)
    if usd is not None and usd_cap is not None and usd > usd_cap:
        err_console.print(f"[yellow]warning:[/] the expected cost ${usd:,.2f} is above the budget ${usd_cap:,.2f}: "
                          "the run will be stopped at the cap (a checkpoint is kept)", highlight=False)
    if not yes and not typer.confirm("Rent these instances and launch?", default=False, err=True):
        raise typer.Exit(1)


def _export(p, target: Path, as_json: bool) -> None:
    """--export: the run directory is prepared (state 'created') and the sbatch script written."""

    if p.recipe.cluster.provider != "slurm":
        raise FtlError(f"--export writes an sbatch script: it needs a SLURM profile (cluster.provider is "
                       f"{p.recipe.cluster.provider!r}); use --cluster cluster/<slurm profile>.yaml")
    if p.resume_from is not None:
        raise FtlError("--export with --resume: submit the run's own job.sbatch again (it continues from the newest "
                       "complete checkpoint)")
    target = path_for_export(target)
    run = write_run(p)
    run.update_state(launcher_pid=None)
    text = export_sbatch(run, p.recipe, p.plan.device)
    (run.dir / "slurm").mkdir(exist_ok=True)  # slurmstepd opens --output before the script runs
    write_atomic(run.dir / "job.sbatch", text, mode=0o755)
    write_atomic(target, text, mode=0o755)
    if as_json:
        sys.stdout.write(json.dumps({"run_id": run.id, "run_dir": str(run.dir), "script": str(target)}, indent=2) + "\n")
        return
    err_console.print(f"wrote {escape(str(target))} for run {run.id}; submit it with: sbatch {escape(str(target))}",
                      highlight=False, soft_wrap=True)


def _run_row(run) -> dict[str, Any]:
    try:
        status = run_status(run)
        st = run.state()
        m = run.last_metrics() or {}
        res = run.result() or {}
        prog = run_progress(run, {**st, "status": status})
    except FtlError:  # a damaged state.json/result.json: list the run anyway
        return {"id": run.id, "status": "unreadable", "recipe": None, "backend": None, "where": None, "started": None,
                "ended": None, "step": None, "loss": None, "dir": str(run.dir), "total_steps": None, "elapsed_s": None,
                "eta_s": None}
    step = m.get("step", res.get("global_step", res.get("steps")))
    backend = st.get("backend") or "local"
    loss = m.get("loss") if isinstance(m.get("loss"), (int, float)) else prog.last_loss  # a finished run: its final loss
    return {"id": run.id, "status": status, "recipe": st.get("recipe"), "backend": backend,
            "where": get_backend(backend, echo=False).where(st), "started": st.get("started"), "ended": st.get("ended"),
            "step": step, "loss": loss, "dir": str(run.dir), "total_steps": prog.total,
            "elapsed_s": prog.elapsed_s, "eta_s": prog.eta_s if status in ("running", "created") else None}


def steps_text(step: Any, total: Any) -> str:
    if step is None:
        return ""
    return f"{step}/{total}" if total else str(step)


def runs_table(rows: list[dict[str, Any]]) -> Table:
    """ftl ps / ftl runs: one row per run in 80 columns; the recipe and start time are in the id (and --json)."""
    colors = {"completed": "green", "failed": "red", "stopped": "yellow", "running": "cyan", "created": "dim"}
    t = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
    t.add_column("id", no_wrap=True, min_width=max(len(r["id"]) for r in rows))  # ids are copied: never cut
    t.add_column("status", no_wrap=True)
    t.add_column("where", overflow="fold")
    for col in ("steps", "elapsed", "ETA", "loss"):
        t.add_column(col, justify="right", no_wrap=True)
    for r in rows:
        c = colors.get(r["status"], "white")
        loss = "" if not isinstance(r["loss"], (int, float)) else sig4(r["loss"])
        where = " ".join(x for x in (r["backend"] or "", r["where"] or "") if x)
        t.add_row(r["id"], f"[{c}]{r['status']}[/]", escape(where), steps_text(r["step"], r.get("total_steps")),
                  "" if r.get("elapsed_s") is None else clock(r["elapsed_s"]),
                  "" if r.get("eta_s") is None else clock(r["eta_s"]), loss)
    return t


@app.command("runs")
def list_runs_cmd(as_json: bool = typer.Option(False, "--json", help="Print JSON for scripts.")) -> None:
    """List runs (from the run directories under ./runs or $FTL_RUNS_DIR)."""

    try:
        rows = [_run_row(r) for r in list_runs()]
    except FtlError as e:
        fail(e)
    if as_json:
        sys.stdout.write(json.dumps(rows, indent=2) + "\n")
        return
    if not rows:
        console.print(f"no runs in {runs_root()}", highlight=False, markup=False)
        return
    console.print(runs_table(rows))


@app.command("ps")
def ps(as_json: bool = typer.Option(False, "--json", help="Print JSON for scripts.")) -> None:
    """Every run under ./runs, whatever its backend, with where it runs; then the live rented instances.

    Runs of every backend (local, SLURM, SSH, rented); then the instances named ftl-* at each provider with an
    API key configured, with their running cost."""
    list_runs_cmd(as_json)
    if not as_json:
        _rented_table()


def _rented_table() -> None:
    try:
        rows = fleet.rented_rows()
    except FtlError as e:
        err_console.print(f"[yellow]warning:[/] could not list rented instances: {escape(str(e))}", highlight=False)
        return
    if not rows:
        return
    t = Table(title="rented instances", title_justify="left", show_edge=False)
    for col in ("provider", "instance", "status", "run", "$/hour", "running cost"):
        t.add_column(col, justify="right" if col in ("$/hour", "running cost") else "left")
    for r in rows:
        owner = r.run_id if r.run_id is not None else "[red]none (orphan)[/]"
        if r.run_id is not None and not r.run_alive:
            owner += " [red](ftl not running: ftl down --orphans)[/]"
        cost = "—" if r.running_cost_usd is None else f"${r.running_cost_usd:,.2f}"
        t.add_row(r.provider, escape(r.name), r.status, owner, f"{r.price_per_hour:g}" if r.price_per_hour else "—", cost)
    console.print(t)


@app.command()
def down(
    run: Optional[str] = typer.Argument(None, help="Run id or directory whose rented instances to terminate."),
    orphans: bool = typer.Option(False, "--orphans", help="Terminate every ftl-* instance, at each rental provider, "
                                 "that belongs to no live run."),
    providers: Optional[list[str]] = typer.Option(None, "--provider", help="With --orphans: ask only this provider "
                                                  "(repeatable; default: every rental provider)."),
) -> None:
    """Terminate rented instances: a run's (ftl down RUN), or those a killed ftl left behind (ftl down --orphans).

    When the run's ftl process is gone but its nodes still train, they are first asked to save a checkpoint,
    and its results are fetched into the run directory (at most FTL_STOP_GRACE_S), so that
    `ftl launch --resume RUN` can continue it. A provider that could not be asked (no API key, a refused key,
    unreachable) is named, and the command exits non-zero."""

    if (run is None) == (not orphans):
        fail(FtlError("give a RUN or --orphans (not both)"))
    unqueried: dict[str, str] = {}
    try:
        if orphans:
            names = [p.strip().lower() for p in providers or []]
            bad = [n for n in names if n not in RENTED]
            if bad:
                raise FtlError(f"--provider {bad[0]!r}: not a rental provider; give one of {', '.join(RENTED)}")
            found, errors, unqueried = fleet.down_orphans(names or None)
            for inst in found:
                err_console.print(f"terminated {inst.provider} {escape(inst.name)} ({inst.id})", highlight=False)
            asked = [n for n in (names or RENTED) if n not in unqueried]
            if not found and not errors and asked:
                err_console.print(f"no orphaned ftl-* instances at {', '.join(asked)}", highlight=False)
        else:
            if providers:
                raise FtlError("--provider goes with --orphans; ftl down RUN asks the run's own provider")
            r = _find(run)
            td = fleet.down_run(r)
            errors = td.failed
            unqueried = {td.provider: td.unqueried} if td.provider and td.unqueried else {}
            err_console.print(f"run {r.id}: terminated {len(td.done)} instance(s)"
                              + (f": {', '.join(td.done)}" if td.done else ""), highlight=False)
    except FtlError as e:
        fail(e)
    for name, why in unqueried.items():
        err_console.print(f"[red]could not query {name}[/]: {escape(why)}", highlight=False, soft_wrap=True)
    if errors:
        fail(FtlError("could not terminate: " + "; ".join(errors)))
    if unqueried:
        fail(FtlError(f"could not query {', '.join(unqueried)}: instances there may still run (set the key, then "
                      "run this again)"))


def _find(ref: Optional[str]):
    if ref:
        return find_run(ref)
    run = newest_run()
    if run is None:
        raise FtlError(f"no runs in {runs_root()}; start one with ftl launch RECIPE")
    return run


@app.command()
def status(
    run: Optional[str] = typer.Argument(None, help="Run id or directory (default: the newest run)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON for scripts."),
) -> None:
    """Status of a run: state, plan, progress, newest complete checkpoint, result."""

    try:
        r = _find(run)
        st = get_backend(r.state().get("backend") or "local").status(r)
        plan = r.plan()
        ckpt = r.newest_checkpoint()
        out = {"state": st, "dir": str(r.dir), "strategy": plan.get("strategy"), "device": plan.get("device"),
               "world_size": plan.get("world_size"), "last_metrics": r.last_metrics(),
               "checkpoint": str(ckpt) if ckpt else None, "result": r.result(), "log": str(r.log_path),
               "progress": run_progress(r, st).to_json()}
    except FtlError as e:
        fail(e)
    if as_json:
        sys.stdout.write(json.dumps(out, indent=2, default=str) + "\n")
        return
    console.print(status_table(r, st, out), highlight=False)


def _result_text(res: dict[str, Any]) -> str:
    """result.json in a line: status, steps, losses, eval, runtime, parameters (the file has the rest)."""
    parts = [str(res.get("status", "?"))]
    if res.get("global_step") is not None:
        parts.append(f"step {steps_text(res.get('global_step'), res.get('max_steps'))}")
    if res.get("first_loss") is not None or res.get("final_loss") is not None:
        parts.append(f"loss {sig4(res.get('first_loss'))} → {sig4(res.get('final_loss'))}")
    ev = res.get("eval") if isinstance(res.get("eval"), dict) else {}
    if ev.get("eval_loss") is not None:
        parts.append(f"eval loss {sig4(ev['eval_loss'])}")
    if res.get("train_runtime_s") is not None:
        parts.append(f"trained in {seconds(res['train_runtime_s'])}")
    pc = res.get("params") if isinstance(res.get("params"), dict) else {}
    if pc.get("total"):
        parts.append(f"{pc.get('trainable', 0):,} of {pc['total']:,} parameters trained")
    if res.get("error"):
        parts.append(f"error: {res['error']}")
    return " · ".join(parts)


def status_table(r, st: dict[str, Any], out: dict[str, Any]) -> Table:
    """ftl status: one row per fact, in words and human numbers (the --json has every field as it is)."""
    t = Table(show_edge=False, show_header=False)
    t.add_column("what", style="bold", no_wrap=True)
    t.add_column("value", overflow="fold")
    t.add_row("run", r.id)
    t.add_row("status", st.get("status", "?") + (f" (exit code {st['returncode']})" if st.get("returncode") not in (None, 0) else ""))
    if st.get("error"):
        t.add_row("error", escape(str(st["error"])))
    t.add_row("recipe", escape(str(st.get("recipe"))))
    t.add_row("plan", f"{out['strategy']} · {out['world_size']} process(es) on {out['device']}")
    t.add_row("started", when(st.get("started")))
    if st.get("ended"):
        t.add_row("ended", when(st.get("ended")))
    if st.get("pid") and st.get("status") == "running":
        t.add_row("pid", str(st["pid"]))
    p = RunProgress(**out["progress"])
    if p.step is not None:
        eta = f" · ETA {clock(p.eta_s)}" if p.eta_s is not None and st.get("status") == "running" else ""
        t.add_row("progress", f"step {steps_text(p.step, p.total)} · elapsed {clock(p.elapsed_s)}{eta}")
    elif p.elapsed_s is not None:
        t.add_row("progress", f"no step yet · elapsed {clock(p.elapsed_s)}")
    if p.last_loss is not None or p.eval_loss is not None:
        t.add_row("loss", " · ".join(x for x in (f"last {sig4(p.last_loss)}" if p.last_loss is not None else "",
                                                f"smoothed {sig4(p.loss)}" if p.loss is not None else "",
                                                f"eval {sig4(p.eval_loss)}" if p.eval_loss is not None else "") if x))
    t.add_row("checkpoint", escape(out["checkpoint"] or "none complete"))
    for c in st.get("resumed_from") or []:
        t.add_row("resumed from", escape(str(c)))
    if out["result"]:
        t.add_row("result", escape(_result_text(out["result"])))
    t.add_row("dir", escape(out["dir"]))
    t.add_row("log", escape(out["log"]))
    return t


@app.command()
def logs(
    run: str = typer.Argument(..., help="Run id or directory."),
    follow: bool = typer.Option(False, "--follow", "-f", help="Keep printing until the run ends."),
    rank: Optional[int] = typer.Option(None, "--rank", help="Multi-node runs: the log of node N (its processes' "
                                       "output, logs/node-N.log); default node 0."),
    verbose: bool = VerboseOpt,
) -> None:
    """Print a run's log: logs/launch.log on this machine, node 0's log (or --rank N) on SLURM/SSH.

    With -f on a terminal, a running local or SLURM run is followed in the live view ftl launch shows."""

    try:
        r = _find(run)
        backend = get_backend(r.state().get("backend") or "local")
        path = backend.log_path(r, rank)
        if not path.is_file() and not follow:
            raise FtlError(f"run {r.id} has no log yet ({path})")
        provider = r.state().get("backend") or "local"
        if follow and console.is_terminal and provider in LIVE_PROVIDERS and run_status(r) in ("created", "running"):
            with LiveView(r, path, console, verbose=verbose) as view:
                view.stop_when(lambda: run_status(r) not in ("created", "running"))
            return
        for line in backend.logs(r, follow=follow, rank=rank):
            sys.stdout.write(line + "\n")
            sys.stdout.flush()
    except FtlError as e:
        fail(e)
    except KeyboardInterrupt:
        raise typer.Exit(130)


@app.command()
def cancel(run: str = typer.Argument(..., help="Run id or directory.")) -> None:
    """Ask a run to save a checkpoint and stop, on every rank of every node.

    A pending SLURM job is cancelled. Continue the run later with ftl launch --resume RUN."""
    stop(run)


@app.command()
def stop(run: str = typer.Argument(..., help="Run id or directory.")) -> None:
    """Same as `ftl cancel`."""

    try:
        r = _find(run)
        ok = get_backend(r.state().get("backend") or "local").cancel(r)
    except FtlError as e:
        fail(e)
    if not ok:
        fail(FtlError(f"run {r.id} is not running"))
    err_console.print(f"asked run {r.id} to stop; continue it later with: ftl launch --resume {r.id}", highlight=False)


def _train_helper(module: str, name: str):
    """A function of the trainer (launcher.train.*, which imports torch): loaded only by the commands that need it."""
    try:
        return getattr(importlib.import_module(f"launcher.train.{module}"), name)
    except (ImportError, AttributeError) as e:
        raise FtlError(f"launcher.train.{module}.{name} is not available in this install ({e})") from None


@app.command()
def merge(
    run: str = typer.Argument(..., help="Run id or directory."),
    out: Optional[Path] = typer.Option(None, "--out", help="Where to write the merged model (default: RUN/merged)."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Show the libraries' warnings and notices (else they "
                                 "go to RUN/logs/merge.log)."),
) -> None:
    """Merge a run's LoRA adapter into its base model (a plain transformers folder)."""
    try:
        r = _find(run)
        with libraries_to(r.dir / "logs" / "merge.log", verbose):
            merge_run = _train_helper("merge", "merge_run")
            path = merge_run(r.dir, out or r.dir / "merged")
    except FtlError as e:
        fail(e)
    console.print(f"merged model: {path}", highlight=False, markup=False, soft_wrap=True)


@app.command()
def chat(
    run: str = typer.Argument(..., help="Run id or directory."),
    prompt: Optional[str] = typer.Option(None, "--prompt", "-p", help="Answer this one prompt and exit."),
    max_new_tokens: int = typer.Option(128, "--max-new-tokens", min=1, max=65536, help="Longest answer, in tokens."),
    temperature: float = typer.Option(0.0, "--temperature", min=0.0, max=10.0, help="0: greedy; above 0: sampled."),
    top_p: float = typer.Option(1.0, "--top-p", min=0.0, max=1.0, help="Nucleus sampling (with --temperature)."),
) -> None:
    """Talk to a run's trained model: the prompt rendered as training rendered it (the chat template
    with the conversation so far for chat data; the instruction template for Alpaca data), the
    answer streamed as it is generated. Type /exit or press Ctrl-D to leave.

    Example: ftl chat quickstart-20261206-120000 --prompt "Add the two numbers. 2 + 3"
    """
    try:
        r = _find(run)
        Chat = _train_helper("generate", "Chat")
        with err_console.status("loading the trained model"), libraries_to(r.dir / "logs" / "chat.log"):
            session = Chat(r.dir)
    except FtlError as e:
        fail(e)

    def say(piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    def answer(text: str) -> None:
        try:
            session.reply(text, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, on_text=say)
        except FtlError as e:
            fail(e)
        sys.stdout.write("\n")

    if prompt is not None:
        answer(prompt)
        return
    err_console.print(f"[dim]{escape(r.id)}: {session.recipe.method} {session.recipe.task}"
                      f"{', multi-turn' if session.multi_turn else ', each prompt alone'}; /exit or Ctrl-D to leave[/dim]")
    while True:
        try:
            text = console.input("[bold]you>[/bold] ")
        except (EOFError, KeyboardInterrupt):
            sys.stdout.write("\n")
            return
        if text.strip() in ("/exit", "/quit"):
            return
        if text.strip():
            answer(text)


@app.command()
def generate(
    run: str = typer.Argument(..., help="Run id or directory."),
    prompt: str = typer.Option(..., "--prompt", "-p", help="Prompt text."),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", min=1),
) -> None:
    """The trained model's answer to one prompt (the same as ftl chat RUN --prompt TEXT)."""
    chat(run, prompt=prompt, max_new_tokens=max_new_tokens, temperature=0.0, top_p=1.0)


@app.command()
def preview(
    recipe: Path = typer.Argument(..., help="Recipe YAML (recipes/*.yaml)."),
    n: int = typer.Option(3, "-n", "--examples", min=0, max=1000, help="How many training examples to show."),
    sets: Optional[list[str]] = SetOpt,
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object for scripts."),
) -> None:
    """Show the first training examples exactly as the model sees them, the tokens that carry the loss
    marked (colour in a terminal, [[brackets]] otherwise), and the dataset's token statistics.

    It runs the trainer's own rendering and masking (chat templates, train_on, truncation at
    data.max_seq_len), on this machine, without weights or a GPU.

    Example: ftl preview recipes/quickstart.yaml --set data.path=data/chat.jsonl -n 2
    """
    try:
        r = load_recipe(recipe, sets=sets)
        run_preview = _train_helper("preview", "preview")
        res = run_preview(r, n)
    except FtlError as e:
        fail(e)
    if as_json:
        sys.stdout.write(json.dumps(res.to_json(), indent=2, default=str) + "\n")
    else:
        render_preview(res.to_json(), color=console.is_terminal)


import_app = typer.Typer(help="Turn another tool's config into an ftl recipe.", no_args_is_help=True)
app.add_typer(import_app, name="import")


@import_app.command("axolotl")
def import_axolotl_cmd(
    config: Path = typer.Argument(..., help="An axolotl config (YAML)."),
    out: Optional[Path] = typer.Option(None, "-o", "--out", help="Write the recipe here (default: standard output)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace the --out file if it exists."),
) -> None:
    """Write an ftl recipe from an axolotl config: model, method, LoRA, data, hyper-parameters and
    DeepSpeed/FSDP. Every key it converts or cannot map is listed on stderr and in a comment block
    at the top of the recipe; nothing is dropped silently.

    Example: ftl import axolotl examples/llama-3/qlora.yml -o recipes/my-qlora.yaml
    """
    try:
        cfg = read_axolotl(config)
        out_dir = (out.parent if out else Path.cwd())
        if out is not None and out.exists() and not overwrite:
            raise FtlError(f"--out {out}: the file exists; pass --overwrite to replace it, or choose another name")
        name = re.sub(r"[^A-Za-z0-9_.-]+", "-", (out.stem if out else config.stem)) or "imported"
        res = import_axolotl(cfg, config.resolve().parent, out_dir, name)
        text = res.text(str(config))
        if out is not None:
            write_atomic(out, text)
    except FtlError as e:
        fail(e)
    for line in res.converted:
        err_console.print(f"converted: {line}", markup=False, highlight=False, soft_wrap=True)
    for line in res.left_out:
        err_console.print(f"not imported: {line}", markup=False, highlight=False, soft_wrap=True)
    if out is None:
        sys.stdout.write(text)
    else:
        console.print(f"wrote {out}: check it with ftl estimate {out}", markup=False, highlight=False, soft_wrap=True)


@app.command()
def version() -> None:
    """Print ftl's version (also: ftl --version)."""
    console.print(__version__, highlight=False)


@app.command("env")
def env_cmd(as_json: bool = typer.Option(False, "--json", help="Print one JSON object.")) -> None:
    """What a bug report needs: versions, GPUs, driver, tools and which keys are set (never their values).

    Versions of ftl, Python and the training stack (torch with CUDA and NCCL, transformers, peft, trl,
    accelerate, deepspeed, bitsandbytes and its backend, Liger), the GPUs and driver, whether sbatch and ssh
    exist, and which provider keys are set. Paste it into a bug report.
    """
    d = environment()
    if as_json:
        sys.stdout.write(json.dumps(d, indent=2) + "\n")
    else:
        render_env(d)


@app.command("prices")
def prices_cmd(
    provider: Optional[str] = typer.Option(None, "--provider", "-p", help="runpod or lambda."),
    gpu: Optional[str] = typer.Option(None, "--gpu", help="A GPU catalog key or alias (ftl gpus)."),
    refresh: bool = typer.Option(False, "--refresh", help="Read live prices (RUNPOD_API_KEY / LAMBDA_API_KEY) and cache them."),
    clusters: Optional[list[Path]] = typer.Option(None, "--clusters", help="Also list the prices of these cluster profiles (files or folders)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON for scripts."),
) -> None:
    """On-demand USD per GPU-hour by provider, with date and source; warns when older than 30 days."""


    try:
        if provider and provider.lower() not in P.PROVIDERS:
            raise FtlError(f"--provider {provider!r}: known providers are {', '.join(P.PROVIDERS)}")
        notes: dict[str, Any] = {}
        if refresh:
            notes = P.refresh([provider.lower()] if provider else None)
            for prov, s in notes.items():
                if s["ok"]:
                    extra = f" ({len(s['unknown'])} types not in the GPU catalog)" if s.get("unknown") else ""
                    err_console.print(f"{prov}: {s['count']} live prices cached in {P.cache_path()}{extra}", highlight=False)
                else:
                    err_console.print(f"[yellow]warning:[/] {escape(s['error'])}", highlight=False, soft_wrap=True)
        rows = P.all_prices(provider, gpu)
        profiles = P.profile_prices(clusters) if clusters else []
    except FtlError as e:
        fail(e)
    today = dt.date.today()
    if as_json:
        sys.stdout.write(json.dumps({"today": today.isoformat(), "stale_after_days": P.STALE_DAYS,
                                     "prices": [r.to_json(today) for r in rows], "profiles": profiles,
                                     "refresh": notes}, indent=2) + "\n")
        if any(not s["ok"] for s in notes.values()):
            raise typer.Exit(1)
        return
    t = Table(title="on-demand USD per GPU-hour", title_justify="left", show_edge=False)
    for c, j in (("provider", "left"), ("tier", "left"), ("gpu", "left"), ("$/GPU-h", "right"), ("date", "left"),
                 ("age", "right")):
        t.add_column(c, justify=j, no_wrap=True)
    t.add_column("source", overflow="fold")
    stale = set()
    for r in rows:
        date = f"live {r.fetched_at}" if r.live else r.date
        age = f"{r.age_days(today)} d"
        if r.stale(today):
            stale.add((r.provider, r.date))
            date, age = f"[yellow]{date}[/]", f"[yellow]{age}[/]"
        note = f" ({r.provider_type})" if r.live and r.provider_type else ""
        t.add_row(r.provider, r.tier, r.gpu, f"{r.usd_per_gpu_hour:.2f}", date, age, escape(r.source + note))
    for p in profiles:
        t.add_row(f"profile {p['profile']}", p["provider"] or "", p["gpu"] or "—", f"{p['usd_per_gpu_hour']:.2f}",
                  p["date"] or "—", "", escape(p["source"] or p["file"]))
    console.print(t)
    if not rows and not profiles:
        console.print("no prices match")
    for prov, date in sorted(stale):
        err_console.print(f"[yellow]warning:[/] {prov} prices dated {date} are more than {P.STALE_DAYS} days old; "
                          f"ftl prices --refresh --provider {prov} reads live ones ({provider_facts()[prov]['key_env']})"
                          if prov in P.PROVIDERS else
                          f"[yellow]warning:[/] {prov} prices dated {date} are more than {P.STALE_DAYS} days old",
                          highlight=False, soft_wrap=True)
    if any(not s["ok"] for s in notes.values()):
        raise typer.Exit(1)  # the table shows what is known, but the refresh asked for did not happen


@app.command("report")
def report_cmd(
    run: str = typer.Argument(..., help="Run id or directory."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON for scripts."),
) -> None:
    """Estimate vs actual for a run: memory, step time, total time, GPU-hours, cost."""

    try:
        d = report(find_run(run))
    except FtlError as e:
        fail(e)
    if as_json:
        sys.stdout.write(json.dumps(d, indent=2) + "\n")
        return
    p, a, r = d["predicted"], d["actual"], d["ratio_actual_over_predicted"]
    console.print(f"[bold]{d['run_id']}[/] ({d['status']}): {d['strategy']}, {d['processes']} process(es) on "
                  f"{d['device']}, ${d['price_per_gpu_hour']:.2f}/GPU-h ({escape(str(d['price_source']))})", highlight=False)

    def num(x, fmt="{:.4g}"):
        return "—" if x is None else fmt.format(x)

    t = Table(show_edge=False)
    for c, j in (("", "left"), ("predicted", "right"), ("actual", "right"), ("actual/predicted", "right")):
        t.add_column(c, justify=j)
    t.add_row("peak memory per device", gib(p["peak_memory_bytes"]),
              gib(a["peak_memory_bytes"]) if a["peak_memory_bytes"] else "not recorded", num(r["peak_memory"], "{:.2f}×"))
    t.add_row("step time", seconds(p["step_time_s"]), seconds(a["step_time_s"]), num(r["step_time"], "{:.2f}×"))
    t.add_row("total time", seconds(p["total_time_s"]), seconds(a["wall_s"]), num(r["total_time"], "{:.2f}×"))
    t.add_row("GPU-hours", gpu_hours(p["gpu_hours"]), gpu_hours(a["gpu_hours"]), num(r["gpu_hours"], "{:.2f}×"))
    t.add_row("cost", dollars(p["cost_usd"]), dollars(a["cost_usd"]), num(r["cost"], "{:.2f}×"))
    console.print(t)
    if d["device"] != "cuda":
        console.print("[dim]on the CPU: no GPU-hours and no time prediction (the estimate models GPUs only)[/]")


@app.command("plan")
def plan_cmd(
    recipe: Path = typer.Argument(..., help="Recipe YAML (recipes/*.yaml)."),
    clusters: Optional[list[Path]] = typer.Option(None, "--clusters", help="Cluster profile YAML files or folders to search (repeatable; default: the shipped cluster/ folder)."),
    objective: str = typer.Option("time", "--objective", help="time (fastest) or cost (cheapest)."),
    budget: Optional[float] = typer.Option(None, "--budget", help="Most USD the job may cost (default: the recipe's budget.max_cost_usd)."),
    deadline: Optional[str] = typer.Option(None, "--deadline", help="Longest the job may take, boot and download included: 6h, 90m, 2d (default: budget.max_hours)."),
    max_gpus: Optional[int] = typer.Option(None, "--max-gpus", help="Consider at most this many GPUs."),
    allow_methods: Optional[list[str]] = typer.Option(None, "--allow-method", help="Also consider this method, e.g. qlora (repeatable)."),
    allow_precisions: Optional[list[str]] = typer.Option(None, "--allow-precision", help="Also consider this train.precision, e.g. bf16-pure (no fp32 master weights; repeatable)."),
    allow_cross_entropy: Optional[list[str]] = typer.Option(None, "--allow-cross-entropy", help="Also consider this train.cross_entropy, e.g. chunked (repeatable)."),
    allow_activation_offloading: bool = typer.Option(False, "--allow-activation-offloading", help="Also consider train.activation_offloading (saved activations in host RAM between forward and backward)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object for scripts."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Write a PNG scatter of time vs cost with the Pareto frontier (replaces only a plot ftl wrote)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Let --plot replace a file that is not an ftl plot."),
    sets: Optional[list[str]] = SetOpt,
    top: int = typer.Option(10, "--top", min=1, help="Rows in the table (at least 1)."),
) -> None:
    """Search GPUs, GPU counts, strategies, offload, micro-batch, checkpointing (and the methods, precisions and
    cross-entropies you allow: they change the numerics, so never silently) for the fastest or cheapest plan
    that fits RECIPE, and print the `ftl launch` line that runs it.

    Example: ftl plan recipes/llama3-70b-qlora-zero3.yaml --objective cost --deadline 6h
    """

    try:
        r = load_recipe(recipe, sets=sets)
        if plot is not None:
            check_plot_path(plot, overwrite)  # before the search, not after it
        profiles, paths = load_profiles(clusters)
        res = run_plan(r, profiles, objective=objective, budget_usd=budget,
                       deadline_s=parse_duration(deadline) if deadline else None, max_gpus=max_gpus,
                       allow_methods=allow_methods or (), cluster_paths=paths, recipe_path=str(recipe), sets=sets or (),
                       allow_precisions=allow_precisions or (), allow_cross_entropy=allow_cross_entropy or (),
                       allow_activation_offloading=allow_activation_offloading)
        if plot is not None:
            write_plot(res, plot, overwrite)
    except FtlError as e:
        fail(e)
    if as_json:
        sys.stdout.write(json.dumps(res.to_json(limit=top), indent=2) + "\n")
        return
    ranked = res.ranked()
    console.print(f"[bold]{escape(r.name)}[/]: {len(res.candidates)} candidates estimated, {len(ranked)} fit; "
                  f"objective: {res.objective}" + "".join(f"\n[dim]skipped {escape(s)}[/]" for s in res.skipped))
    t = Table(title=f"best {min(top, len(ranked))} by {res.objective} (★ time/cost Pareto frontier, → chosen; "
                    "GiB peak per GPU)",
              title_justify="left", box=None, pad_edge=False, collapse_padding=True,
              header_style="bold underline")
    # at the terminal's width (80 columns hold it): only a long profile name folds, no cell wraps mid-word
    for col in ("", "profile", "strategy", "GPUs", "method µ×acc", "GiB", "time", "cost", "$/Mtok"):
        t.add_column(col, justify="left" if col in ("", "profile", "strategy", "GPUs", "method µ×acc") else "right",
                     no_wrap=col != "profile", overflow="fold" if col == "profile" else "ellipsis")
    shown = ranked[:top] + [c for c in res.frontier if c not in ranked[:top]]
    off = {"none": "", "optimizer": "+opt", "params": "+param"}
    for c in shown:
        mark = ("→" if c is res.chosen else "") + ("★" if c.frontier else "")
        t.add_row(mark, escape(c.profile), f"{c.strategy}{off[c.offload]}", f"{c.nodes}×{c.gpus_per_node} {escape(c.short_gpu.split()[0])}",
                  f"{c.method} {c.micro_batch_size}×{c.grad_accum}{' ckpt' if c.gradient_checkpointing else ''}",
                  f"{c.peak_bytes / 1024**3:.1f}", seconds(c.total_time_s), dollars(c.cost_usd),
                  "—" if c.cost_per_mtok_usd is None else f"${c.cost_per_mtok_usd:,.3f}")
    console.print(t)
    console.print(f"[bold]chosen:[/] {escape(res.explanation)}", soft_wrap=True)
    for note in res.price_notes(top):
        console.print(f"[yellow]{escape(note)}[/]", soft_wrap=True)
    console.print("[bold]run it:[/]")
    console.print(escape(res.launch_command), soft_wrap=True, highlight=False)
    if plot is not None:
        console.print(f"plot written to {escape(str(plot))}")


def main() -> None:
    app()
