"""Recipe and cluster loading: overrides, precedence, relative paths, and errors that name the fix."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from launcher.core.errors import RecipeError
from launcher.spec.recipe import load_recipe

ROOT = Path(__file__).resolve().parent.parent


def write(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return path


@pytest.fixture
def recipe_file(tmp_path):
    write(tmp_path / "clusters" / "p.yaml", {"provider": "slurm", "gpu": "h100-sxm", "gpus_per_node": 4, "nodes": 1,
                                             "price_per_gpu_hour": 2.5, "partition": "gpu", "budget": {"max_hours": 10}})
    return write(tmp_path / "recipes" / "r.yaml", {"name": "r", "model": "llama-3.1-8b", "method": "lora",
                                                    "data": {"path": "../data/train.jsonl"}, "cluster": "../clusters/p.yaml"})


@pytest.mark.parametrize("path", sorted((ROOT / "recipes").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_recipes_validate(path):
    r = load_recipe(path)
    assert r.name and r.cluster.provider in {"local", "slurm", "ssh", "runpod", "lambda"}


@pytest.mark.parametrize("path", sorted((ROOT / "cluster").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_profiles_validate(path):
    from launcher.spec.recipe import load_cluster

    c = load_cluster(path)
    if c.provider in ("runpod", "lambda"):
        assert c.price_per_gpu_hour > 0 and c.price_date and c.price_source


def test_relative_paths_resolve_against_the_recipe_folder(recipe_file, tmp_path):
    r = load_recipe(recipe_file)
    assert r.data.path == str((tmp_path / "data" / "train.jsonl").resolve())
    assert r.cluster.partition == "gpu" and r.cluster.name == "p"


def test_precedence_defaults_profile_recipe_command_line(recipe_file):
    r = load_recipe(recipe_file)
    assert r.train.micro_batch_size == 1  # built-in default
    assert r.cluster.gpus_per_node == 4  # profile
    raw = yaml.safe_load(recipe_file.read_text())
    raw["cluster"] = {"profile": "../clusters/p.yaml", "gpus_per_node": 2}
    write(recipe_file, raw)
    assert load_recipe(recipe_file).cluster.gpus_per_node == 2  # recipe beats profile
    r = load_recipe(recipe_file, sets=["cluster.gpus_per_node=8", "train.micro_batch_size=4", "lora.target_modules=[q_proj, v_proj]"])
    assert r.cluster.gpus_per_node == 8 and r.train.micro_batch_size == 4  # command line beats both
    assert r.lora.target_modules == ["q_proj", "v_proj"]
    assert load_recipe(recipe_file, gpus_per_node=3, nodes=2).cluster.world_size == 6
    assert r.cluster.budget.max_hours == 10


def test_set_reaches_a_profile_named_as_a_string(recipe_file):
    r = load_recipe(recipe_file, sets=["cluster.nodes=2"])
    assert r.cluster.nodes == 2 and r.cluster.partition == "gpu"


def test_budget_recipe_wins_over_profile(recipe_file):
    r = load_recipe(recipe_file, sets=["budget.max_hours=3", "budget.max_cost_usd=50"])
    assert r.effective_budget.max_hours == 3 and r.effective_budget.max_cost_usd == 50


@pytest.mark.parametrize(
    "change,field,fix",
    [
        ({"methd": "lora"}, "methd", "Did you mean 'method'"),
        ({"method": "qlorra"}, "method", "Did you mean 'qlora'"),
        ({"train": {"micro_batch_sise": 2}}, "train.micro_batch_sise", "Did you mean 'micro_batch_size'"),
        ({"train": {"micro_batch_size": 0}}, "train.micro_batch_size", "greater than 0"),
        ({"train": {"optimizer": "adam"}}, "train.optimizer", "Did you mean 'adamw'"),
        ({"parallel": {"strategy": "zero4"}}, "parallel.strategy", "must be one of"),
        ({"cluster": {"profile": "../clusters/p.yaml", "gpus_per_nod": 2}}, "cluster.gpus_per_nod", "Did you mean 'gpus_per_node'"),
    ],
)
def test_bad_recipe_names_file_field_value_and_fix(recipe_file, change, field, fix):
    raw = yaml.safe_load(recipe_file.read_text())
    raw.update(change)
    write(recipe_file, raw)
    with pytest.raises(RecipeError) as e:
        load_recipe(recipe_file)
    msg = str(e.value)
    assert str(recipe_file) in msg and field in msg and fix in msg


def test_missing_name_and_bad_yaml(tmp_path):
    with pytest.raises(RecipeError, match="name.*required"):
        load_recipe(write(tmp_path / "a.yaml", {"model": "gpt2"}))
    with pytest.raises(RecipeError, match="not valid YAML at line"):
        load_recipe(write(tmp_path / "b.yaml", "name: x\n  model: [\n"))
    with pytest.raises(RecipeError, match="not a mapping of keys"):
        load_recipe(write(tmp_path / "c.yaml", "- a\n- b\n"))
    with pytest.raises(RecipeError, match="no such file"):
        load_recipe(tmp_path / "missing.yaml")


def test_missing_profile_and_bad_set(recipe_file):
    with pytest.raises(RecipeError, match="no cluster profile"):
        load_recipe(recipe_file, sets=["cluster.profile=nowhere.yaml"])
    with pytest.raises(RecipeError, match="key.path=value"):
        load_recipe(recipe_file, sets=["train.micro_batch_size"])


def test_unknown_model_suggests_catalog_name(tmp_path):
    from launcher.spec.catalog import UnknownModel, resolve_model

    with pytest.raises(UnknownModel, match="Did you mean 'llama-3.1-8b'"):
        resolve_model("llama-3.1-8")
    with pytest.raises(UnknownModel, match="has no config.json"):
        resolve_model(str(tmp_path))
    with pytest.raises(UnknownModel, match="offline"):
        resolve_model("someone/unknown-model")  # HF_HUB_OFFLINE=1 in tests


def test_model_resolution_orders(model_dir, tmp_path):
    from launcher.spec.catalog import config_cache_dir, resolve_model

    assert resolve_model("meta-llama/Llama-3.1-8B").origin == "catalog"
    assert resolve_model("LLAMA-3.1-8B").name == "llama-3.1-8b"
    d = model_dir("gpt2")
    spec = resolve_model(str(d))
    assert spec.origin == "local" and spec.config["model_type"] == "gpt2"
    cached = config_cache_dir() / "acme" / "tiny" / "config.json"
    cached.parent.mkdir(parents=True, exist_ok=True)
    cached.write_text((d / "config.json").read_text())
    assert resolve_model("acme/tiny").origin == "hub-cache"


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FTL_CACHE", str(tmp_path / "cache"))


@pytest.mark.parametrize("sets,field,value", [
    ({"train": {"precision": "bf16-pure"}, "parallel": {"strategy": "zero3"}}, "parallel.strategy", "zero3"),
    ({"train": {"precision": "bf16-pure"}, "method": "qlora", "quantization": {"compute_dtype": "fp16"}},
     "quantization.compute_dtype", "fp16"),
    ({"method": "qlora", "quantization": {"bits": 8}}, "quantization.bits", 8),
    # Liger's fused linear cross-entropy: DAPT only (TRL's SFT and DPO trainers score tokens themselves)
    ({"task": "sft", "train": {"cross_entropy": "fused"}}, "train.cross_entropy", "fused"),
    ({"task": "dpo", "train": {"cross_entropy": "fused"}}, "train.cross_entropy", "fused"),
    ({"task": "classification", "train": {"cross_entropy": "chunked"}}, "train.cross_entropy", "chunked"),
])
def test_conflicting_keys_name_the_field_value_and_fix(tmp_path, sets, field, value):
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump({"name": "t", "model": "llama-3.2-1b", **sets}))
    with pytest.raises(RecipeError) as ei:
        load_recipe(p)
    e = ei.value
    assert e.file == str(p) and e.field == field and e.value == value
    assert "{" not in str(e)  # the field's value, not the whole recipe


def test_fused_cross_entropy_on_the_cpu_is_refused_with_chunked(tmp_path):
    """A fused-loss DAPT recipe validates (it is estimated for GPUs) but a CPU world refuses it before anything
    starts, naming the key and the fix."""
    from launcher.core.errors import FtlError
    from launcher.launch import check_cpu

    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump({"name": "t", "model": "llama-3.2-1b", "task": "dapt",
                                 "train": {"cross_entropy": "fused"}}))
    recipe = load_recipe(p)
    with pytest.raises(FtlError) as ei:
        check_cpu(recipe)
    assert "train.cross_entropy = 'fused'" in str(ei.value) and "train.cross_entropy=chunked" in str(ei.value)
