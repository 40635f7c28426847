"""`ftl estimate` end to end: JSON contract, no torch, fits/suggestions, cost arithmetic, errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from launcher.estimate.search import estimate
from launcher.spec.recipe import load_recipe, recipe_from_dict

ROOT = Path(__file__).resolve().parent.parent
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))


def ftl(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "launcher.cli", *args], capture_output=True, text=True, cwd=ROOT,
                          check=check, env={"HF_HUB_OFFLINE": "1", "FTL_NO_GPU_DETECT": "1", "PATH": "/usr/bin:/bin",
                                            "COLUMNS": "160"})


def test_json_contract_and_no_torch_import():
    code = (
        "import sys, json, io, contextlib\n"
        "from launcher.cli import app\n"
        "buf = io.StringIO()\n"
        "with contextlib.redirect_stdout(buf):\n"
        "    try: app(['estimate', 'recipes/llama3-8b-qlora.yaml', '--json'])\n"
        "    except SystemExit as e: assert e.code in (0, None), e.code\n"
        "heavy = [m for m in ('torch', 'transformers', 'peft', 'bitsandbytes', 'deepspeed', 'accelerate', 'datasets') if m in sys.modules]\n"
        "print(json.dumps({'heavy': heavy, 'out': json.loads(buf.getvalue())}))\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True,
                         env={"HF_HUB_OFFLINE": "1", "FTL_NO_GPU_DETECT": "1", "PATH": "/usr/bin:/bin"})
    got = json.loads(res.stdout.splitlines()[-1])
    assert got["heavy"] == []
    d = got["out"]
    for key in ("model", "per_device", "cpu_bytes_per_node", "disk_bytes", "gpu", "fits", "tokens_per_step",
                "flops_per_step", "step_time_s", "total_time_s", "cost_usd", "assumptions"):
        assert key in d
    assert {"name", "params_total", "params_trainable"} <= set(d["model"])
    for key in ("weights_bytes", "gradients_bytes", "optimizer_bytes", "activations_bytes", "logits_bytes",
                "overhead_bytes", "peak_bytes"):
        assert isinstance(d["per_device"][key], int) and d["per_device"][key] >= 0
    assert {"name", "memory_bytes"} <= set(d["gpu"])
    assert d["model"]["params_total"] == 8_030_261_248
    assert d["fits"] is True and d["gpu"]["name"]
    assert d["per_device"]["peak_bytes"] == d["per_device"]["peak_allocated_bytes"] + d["per_device"]["overhead_bytes"]


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_every_shipped_recipe_estimates(path):
    e = estimate(load_recipe(path))
    d = e.to_json()
    assert d["per_device"]["peak_bytes"] > d["per_device"]["weights_bytes"] > 0
    assert d["flops_per_step"] > 0 and d["tokens_per_step"] > 0
    if d["gpu"]["name"]:
        assert d["step_time_s"] > 0
        # cost is time x GPUs x price, exactly
        assert d["cost_usd"] == pytest.approx(d["total_time_s"] / 3600 * e.world_size * e.recipe.cluster.price_per_gpu_hour, rel=1e-12)


def test_no_gpu_means_fits_null(model_dir):
    r = recipe_from_dict({"name": "t", "model": str(model_dir("llama")), "method": "full", "data": {"max_seq_len": 64}})
    d = estimate(r).to_json()
    assert d["fits"] is None and d["gpu"]["memory_bytes"] is None
    assert d["total_time_s"] is None and d["cost_usd"] is None  # no data size, no GPU
    assert d["per_device"]["overhead_bytes"] == 0


def test_does_not_fit_says_by_how_much_and_what_fixes_it():
    r = load_recipe(ROOT / "recipes" / "llama3-8b-qlora.yaml", sets=["method=full", "train.optimizer=adamw", "cluster.gpu=a10g",
                                                                   "train.gradient_checkpointing=false"])
    e = estimate(r)
    assert e.fits is False and e.shortfall_bytes > 0
    assert e.suggestions, "a recipe that does not fit comes with changes that make it fit"
    for s in e.suggestions:
        assert s["peak_bytes"] <= s["usable_bytes"]
        alt = estimate(load_recipe(ROOT / "recipes" / "llama3-8b-qlora.yaml", sets=[
            "method=full", "train.optimizer=adamw", "cluster.gpu=a10g", "train.gradient_checkpointing=false",
            *(f"{k}={v}" for k, v in s["set"].items())]))
        assert alt.fits and alt.memory.peak == s["peak_bytes"]
    res = ftl("estimate", "recipes/llama3-8b-qlora.yaml", "--set", "method=full", "--set", "train.optimizer=adamw",
              "--set", "cluster.gpu=a10g")
    assert "does not fit by" in res.stdout


def test_unknown_data_size_gives_null_time(model_dir):
    r = recipe_from_dict({"name": "t", "model": str(model_dir("llama")), "cluster": {"gpu": "h100-sxm"}})
    d = estimate(r).to_json()
    assert d["step_time_s"] > 0 and d["total_time_s"] is None and d["cost_usd"] is None


def test_local_data_is_counted_with_the_local_tokenizer(tmp_path, model_dir):
    from tokenizers import Tokenizer, models, pre_tokenizers

    d = model_dir("llama")
    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "hello": 1, "world": 2}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(d / "tokenizer.json"))
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(json.dumps({"instruction": "hello world", "output": "hello"}) for _ in range(10)))
    r = recipe_from_dict({"name": "t", "model": str(d), "data": {"path": str(data), "validation_fraction": 0}})
    e = estimate(r)
    from launcher.spec.prompts import alpaca_prompt

    per_example = len(tok.encode(alpaca_prompt({"instruction": "hello world", "input": ""}, None) + "hello").ids)
    assert (e.data.examples, e.data.tokens) == (10, 10 * per_example) and "tokenizer.json" in e.data.source
    (d / "tokenizer.json").unlink()
    e = estimate(r)
    assert "estimated from characters" in e.data.source


def test_bad_recipe_exits_2_with_message(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"name": "x", "model": "llama-3.1-8b", "metod": "lora"}))
    res = ftl("estimate", str(bad), check=False)
    assert res.returncode == 2
    assert "metod" in res.stderr and "Did you mean 'method'" in res.stderr and "Traceback" not in res.stderr
    res = ftl("estimate", str(bad), "--set", "metod=lora", check=False)
    assert res.returncode == 2


def test_human_output_renders():
    res = ftl("estimate", "recipes/llama3-8b-qlora.yaml")
    assert "peak" in res.stdout and "fits" in res.stdout and " a step × " in res.stdout
    assert "Llama" in ftl("models").stdout or "llama-3.1-8b" in ftl("models").stdout
    assert "h100-sxm" in ftl("gpus").stdout


def test_dpo_full_counts_the_reference_copy():
    lora = estimate(load_recipe(ROOT / "recipes" / "llama3-1b-dpo.yaml"))
    full = estimate(load_recipe(ROOT / "recipes" / "llama3-1b-dpo.yaml", sets=["method=full"]))
    assert "dpo reference model" in full.memory.states.detail and "dpo reference model" not in lora.memory.states.detail
    assert full.memory.states.weights == 2 * full.memory.states.detail["dpo reference model"]


SHIPPED = sorted((ROOT / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("gpu", ["l4", "a100-40gb", "h100-sxm"])
def test_every_suggested_set_fits_when_applied(gpu):
    """For each shipped recipe that does not fit on the GPU, each suggestion, applied with its --set lines,
    fits, with the peak it promised."""
    for path in SHIPPED:
        e = estimate(load_recipe(path, sets=[f"cluster.gpu={gpu}"]))
        if e.fits is not False:
            continue
        assert e.suggestions, path.name
        times = [s["step_time_s"] for s in e.suggestions if not s["set"].keys() == {"cluster.gpu"}]
        assert times == sorted(times), (path.name, e.suggestions)  # fastest first
        for s in e.suggestions:
            alt = estimate(load_recipe(path, sets=[f"cluster.gpu={gpu}", *s["sets"]]))
            assert alt.fits and alt.memory.peak == s["peak_bytes"], (path.name, s)


def test_no_faster_set_of_changes_fits_than_the_first_suggested():
    """Exhaustively over the same changes (every combination of up to three, no pruning, no estimate
    budget): nothing fits with a shorter step than the first suggestion, and each suggestion is minimal
    (none of its proper subsets fits)."""
    import itertools

    from launcher.estimate.estimator import estimate_arch
    from launcher.estimate.search import SUGGESTION_MAX_CHANGES, _change_groups, _combine, _with, resolve_strategy

    r = load_recipe(ROOT / "recipes" / "llama3-8b-qlora.yaml", sets=["method=full", "train.optimizer=adamw",
                                                                     "cluster.gpu=a10g", "train.gradient_checkpointing=false"])
    e = estimate(r)
    assert e.fits is False and e.suggestions
    groups = _change_groups(r, e.strategy, e.world_size)
    fits: dict[frozenset, float] = {}
    for size in range(1, SUGGESTION_MAX_CHANGES + 1):
        for gs in itertools.combinations(range(len(groups)), size):
            for changes in itertools.product(*(groups[g] for g in gs)):
                keys = _combine(r, changes)
                if keys is None:
                    continue
                try:
                    alt = _with(r, keys)
                except Exception:  # noqa: BLE001 - does not validate (e.g. bf16-pure under ZeRO)
                    continue
                a = estimate_arch(alt, e.model, e.arch, strategy=keys.get("parallel.strategy") or resolve_strategy(alt))
                if a.fits:
                    fits[frozenset(label for label, _ in changes)] = a.step_time_s
    minimal = {k: t for k, t in fits.items() if not any(o < k for o in fits)}
    first = e.suggestions[0]
    assert first["step_time_s"] == pytest.approx(min(minimal.values()), rel=1e-12)
    for s in e.suggestions:
        if s["set"].keys() == {"cluster.gpu"}:
            continue
        assert frozenset(s["change"].split(" + ")) in minimal, s["change"]


def test_an_old_price_is_said_to_be_old_with_its_age():
    """A price read more than 30 days ago gets one line with its date and age (estimate and plan); --json
    carries price_date and price_age_days (per candidate in plans); a fresh price gets no line."""
    import datetime as dt

    from launcher.estimate.search import plan
    from launcher.spec.recipe import load_profiles

    today = dt.date.today()
    profile = ROOT / "cluster" / "runpod-8xh100.yaml"
    for age, noted in ((31, True), (30, False), (0, False)):
        day = today - dt.timedelta(days=age)
        r = load_recipe(ROOT / "recipes" / "llama3-8b-qlora.yaml", cluster=profile, sets=[f"cluster.price_date={day}"])
        d = estimate(r).to_json()
        assert d["price_date"] == str(day) and d["price_age_days"] == age
        assert bool(d["price_note"]) == noted, d["price_note"]
        if noted:
            assert str(day) in d["price_note"] and f"{age} days ago" in d["price_note"] and "--refresh" in d["price_note"]
        clusters, paths = load_profiles([str(profile)])
        clusters = [c.model_copy(update={"price_date": day}) for c in clusters]
        res = plan(r, clusters, cluster_paths=paths).to_json(limit=3)
        assert all(c["price_date"] == str(day) and c["price_age_days"] == age for c in res["candidates"])
        assert len(res["price_notes"]) == (1 if noted else 0)
    res = ftl("estimate", "recipes/llama3-8b-qlora.yaml", "--cluster", str(profile),
              "--set", f"cluster.price_date={today - dt.timedelta(days=45)}")
    assert res.returncode == 0 and "45 days ago" in res.stdout
