"""The first hour of a new user (issue 16): ftl --version, ftl env, help without Python types and with examples
that run as written, ftl init, messages that point at the right thing, and the checks made before anything
starts (data, hub ids offline, optional packages). No network: the hub's reachability is stood in for."""

from __future__ import annotations

import json
import re
import shlex
import signal
import time
from pathlib import Path

import pytest
import typer
import yaml
from typer.testing import CliRunner

from launcher import __version__, launch
from launcher.cli import environment
from launcher.cli.commands import app
from launcher.core.procs import signal_words
from launcher.spec import catalog, packages
from launcher.spec.examples import _swap
from launcher.spec.recipe import load_recipe

ROOT = Path(__file__).resolve().parent.parent


def ftl(*args: str):
    return CliRunner().invoke(app, list(args))


def commands() -> list[str]:
    res = ftl("--help")
    assert res.exit_code == 0, res.output
    names = re.findall(r"^│ (\w[\w-]*) ", res.stdout, flags=re.M)
    assert {"estimate", "launch", "env", "version", "plan"} <= set(names), names
    return names


def test_version_flag_and_command():
    for args in (["--version"], ["version"]):
        res = ftl(*args)
        assert res.exit_code == 0 and res.stdout.strip() == __version__, res.output


def test_help_shows_no_python_types():
    for name in [None, *commands()]:
        res = ftl(*([name] if name else []), "--help")
        assert res.exit_code == 0, res.output
        for word in ("<bool>", "<int>", "<str>", "<path>", "<float>", "list[", "<Path>"):
            assert word not in res.stdout, f"ftl {name} --help shows {word}:\n{res.stdout}"


def test_help_prose_is_wrapped_by_the_terminal_not_the_docstring():
    out = ftl("launch", "--help").stdout
    assert "submitted through submitit" in out  # the docstring breaks the line between the two words
    assert re.search(r"^\s+ftl launch recipes/quickstart.yaml\s*$", out, flags=re.M)  # examples keep their lines


def _examples() -> list[list[str]]:
    """The example command lines of every command's help text, as argv."""
    group = typer.main.get_command(app)
    found = []
    for cmd in group.commands.values():
        for line in (cmd.help or "").splitlines():
            m = re.match(r"\s*(?:Examples?: )?(ftl \S.*)$", line)
            if m:
                found.append(shlex.split(m.group(1))[1:])
    return found


def test_help_examples_name_shipped_files_and_run_as_written(monkeypatch, tmp_path):
    """Every example line in a command's help names files that ship; those that start nothing (estimate, plan,
    launch --dry-run) run as written from the folder ftl ships in and exit 0."""
    monkeypatch.chdir(ROOT)
    examples = _examples()
    assert len(examples) >= 6, examples
    ran = 0
    for argv in examples:
        for word in argv:
            if word.endswith((".yaml", ".yml")):
                assert (ROOT / word).is_file(), f"ftl {' '.join(argv)}: {word} does not ship"
        if argv[0] in ("estimate", "plan") or "--dry-run" in argv:
            res = ftl(*argv)
            assert res.exit_code == 0, f"ftl {' '.join(argv)}: {res.output}"
            ran += 1
    assert ran >= 4


def test_env_reports_versions_tools_and_keys_never_their_values(monkeypatch):
    monkeypatch.setenv("RUNPOD_API_KEY", "rpa_secret_value_123")
    monkeypatch.delenv("LAMBDA_API_KEY", raising=False)
    monkeypatch.setattr(environment, "PACKAGES", environment.PACKAGES + ("no-such-package-ftl",))
    res = ftl("env", "--json")
    assert res.exit_code == 0, res.output
    d = json.loads(res.stdout)
    assert d["ftl"] == __version__ and d["python"]
    assert d["packages"]["no-such-package-ftl"] == "not installed"
    assert d["packages"]["torch"] != "not installed" and d["torch"]["installed"] is True
    assert {"sbatch", "ssh", "nvidia-smi"} <= set(d["tools"])
    assert d["keys"]["RUNPOD_API_KEY"] == "set" and d["keys"]["LAMBDA_API_KEY"] == "not set"
    assert "rpa_secret_value_123" not in res.stdout
    text = ftl("env")
    assert text.exit_code == 0, text.output
    for word in ("ftl:", "python:", "transformers:", "peft:", "trl:", "accelerate:", "deepspeed:", "bitsandbytes:",
                 "liger-kernel:", "bitsandbytes backend:", "nccl:", "nvidia driver:", "gpus:", "sbatch:", "ssh:",
                 "RUNPOD_API_KEY:       set", "no-such-package-ftl:  not installed"):
        assert word in text.stdout, text.stdout
    assert "rpa_secret_value_123" not in text.stdout


def test_env_reads_the_driver_and_the_bitsandbytes_backend(monkeypatch):
    """Without a GPU here: nvidia-smi and a CUDA torch are stand-ins; the parsing and the backend rule are real."""
    out = "NVIDIA H100 80GB HBM3, 550.54.15, 81559 MiB\nNVIDIA H100 80GB HBM3, 550.54.15, 81559 MiB\n"
    monkeypatch.setattr(environment.shutil, "which", lambda name: f"/usr/bin/{name}")
    monkeypatch.setattr(environment.subprocess, "run",
                        lambda *a, **k: environment.subprocess.CompletedProcess(a[0], 0, stdout=out, stderr=""))
    d = environment.driver()
    assert d["driver"] == "550.54.15" and [g["memory"] for g in d["gpus"]] == ["81559 MiB"] * 2
    backend = environment.bitsandbytes_backend({"installed": True, "cuda": "12.8", "cuda_available": True})
    assert backend.startswith("CUDA 12.8 (libbitsandbytes_cuda128") and "found" in backend
    assert environment.bitsandbytes_backend({"installed": True, "hip": "6.4"}) == "ROCm"


def test_env_survives_a_broken_torch(monkeypatch):
    """A torch that fails to import is reported, not raised."""
    real = __import__

    def broken(name, *a, **k):
        if name == "torch":
            raise OSError("libcudart.so.12: cannot open shared object file")
        return real(name, *a, **k)

    monkeypatch.setattr("builtins.__import__", broken)
    facts = environment.torch_facts()
    assert facts["installed"] and "libcudart" in facts["error"]
    res = ftl("env")
    assert res.exit_code == 0 and "cannot be imported" in res.stdout, res.output


# ---------------------------------------------------------------------------------------------
# ftl init


SHIPPED = sorted(p.stem for p in (ROOT / "recipes").glob("*.yaml"))


def test_init_list_shows_every_example_on_one_line():
    res = ftl("init", "--list")
    assert res.exit_code == 0, res.output
    lines = res.stdout.splitlines()
    assert [line.split()[0] for line in lines] == SHIPPED
    assert all(len(line.split(None, 1)) == 2 for line in lines), lines  # a summary on each


@pytest.mark.parametrize("name", SHIPPED)
def test_init_copies_a_recipe_and_its_profile_with_paths_fixed(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    res = ftl("init", name)
    assert res.exit_code == 0, res.output
    copy, shipped = tmp_path / f"{name}.yaml", ROOT / "recipes" / f"{name}.yaml"
    assert copy.read_text().splitlines()[0] == shipped.read_text().splitlines()[0]  # comments kept
    a, b = load_recipe(copy), load_recipe(shipped)
    assert (a.model, a.cluster) == (b.model, b.cluster)
    if b.data.path and b.data.path.startswith("/") and not Path(b.data.path).exists():
        assert a.data.path == str(tmp_path / Path(b.data.path).name)  # the user's own corpus/: beside the copy
    else:
        assert a.data.path == b.data.path  # shipped data, or a hub id
    written = sorted(p.name for p in tmp_path.iterdir())
    profile = [p for p in written if p != copy.name]
    assert len(profile) == (1 if "cluster:" in shipped.read_text() else 0), written
    assert f"wrote {copy.name}" in res.stderr


def test_init_default_is_the_quickstart_and_it_estimates(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert ftl("init").exit_code == 0
    res = ftl("estimate", "quickstart.yaml", "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["data"]["examples"]  # the shipped data was found and counted


def test_init_never_overwrites_unless_asked(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "llama3-8b-qlora.yaml").write_text("mine\n")
    res = ftl("init", "llama3-8b-qlora")
    assert res.exit_code == 2 and "llama3-8b-qlora.yaml already exists" in res.stderr and "--overwrite" in res.stderr
    assert (tmp_path / "llama3-8b-qlora.yaml").read_text() == "mine\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["llama3-8b-qlora.yaml"]  # nor its profile
    assert ftl("init", "llama3-8b-qlora", "--overwrite").exit_code == 0
    assert load_recipe(tmp_path / "llama3-8b-qlora.yaml").name == "llama3-8b-qlora"


def test_init_shares_an_identical_profile_and_names_unknown_examples(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert ftl("init", "mistral-7b-lora-chat").exit_code == 0
    res = ftl("init", "qwen2.5-0.5b-dapt")  # the same runpod-a100-80gb.yaml: already there, not a conflict
    assert res.exit_code == 0, res.output
    res = ftl("init", "lama3-8b")
    assert res.exit_code == 2 and "Did you mean 'llama3-8b-qlora'?" in res.stderr and "ftl init --list" in res.stderr


def test_a_path_that_needs_quotes_is_quoted():
    text = _swap("name: x\ndata:\n  path: data/a.jsonl  # here\n", "path", "data/a.jsonl", "/my data/a: b.jsonl",
                 after="data")
    assert yaml.safe_load(text)["data"]["path"] == "/my data/a: b.jsonl" and "# here" in text


# ---------------------------------------------------------------------------------------------
# messages that point at the right thing


QUICK = str(ROOT / "recipes" / "quickstart.yaml")


@pytest.mark.parametrize("args,start", [
    (["--nodes", "0"], "error: --nodes: cluster.nodes = 0: must be greater than 0"),
    (["--gpus-per-node", "0"], "error: --gpus-per-node: cluster.gpus_per_node = 0: must be greater than 0"),
    (["--set", "train.lr=-1"], "error: --set: train.lr = -1: must be greater than 0"),
    (["--set", "trian.lr=1"], "error: --set: trian: unknown key. Did you mean 'train'?"),
    (["--set", "cluster.price_per_gpu_hour=-1"], "error: --set: cluster.price_per_gpu_hour = -1:"),
    (["--set", "method=qlora", "--set", "quantization.bits=8"], "error: --set: quantization.bits = 8: method 'qlora'"),
    (["--cluster", "nope.yaml"], "error: --cluster nope.yaml: no cluster profile there;"),
    (["--set", "cluster.gpu=h101"], "error: --set: cluster.gpu = 'h101': not in the GPU catalog. Did you mean 'h100'?"),
    (["--set", "model=Qwen/Qwen2.5-1.5B"], "error: --set: model = 'Qwen/Qwen2.5-1.5B': not cached here"),
])
def test_errors_from_flags_name_the_flag_not_the_recipe(args, start):
    res = ftl("estimate", QUICK, *args)
    assert res.exit_code == 2 and res.stderr.startswith(start), res.stderr
    assert "quickstart.yaml" not in res.stderr


def test_errors_in_a_profile_name_the_profile_and_its_own_key(tmp_path):
    prof = tmp_path / "p.yaml"
    prof.write_text("provider: local\nnodes: 0\n")
    for extra in ([], ["--gpus-per-node", "1"]):  # a flag on another key does not move the blame
        res = ftl("estimate", QUICK, "--cluster", str(prof), *extra)
        assert res.exit_code == 2 and res.stderr.startswith(f"error: {prof}: nodes = 0:"), res.stderr
    prof.write_text("provider: local\ngpu: h101\n")  # found unknown by the estimate: named as the recipe key
    res = ftl("estimate", QUICK, "--cluster", str(prof))
    assert res.exit_code == 2 and res.stderr.startswith("error: cluster.gpu = 'h101': not in the GPU catalog"), res.stderr


def test_a_typod_section_names_the_key_not_its_content(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("name: x\nmodel: llama-3.2-1b\ntrian:\n  lr: 0.1\n  epochs: 2\n")
    res = ftl("estimate", str(p))
    assert res.exit_code == 2, res.output
    assert res.stderr.startswith(f"error: {p}: trian: unknown key. Did you mean 'train'?"), res.stderr
    assert "epochs" not in res.stderr and "source" not in res.stderr  # nor ftl's own bookkeeping key


@pytest.mark.parametrize("text,sentence", [
    ("", "the file is empty; a recipe needs at least name: and model:"),
    ("# only a comment\n", "the file is empty; a recipe needs at least name: and model:"),
    ("- a\n- b\n", "holds a list, not a mapping of keys"),
])
def test_empty_and_odd_files_get_a_plain_sentence(tmp_path, text, sentence):
    p = tmp_path / "r.yaml"
    p.write_text(text)
    res = ftl("estimate", str(p))
    assert res.exit_code == 2 and res.stderr.strip().replace("\n", " ").startswith(f"error: {p}: {sentence}"), res.stderr
    assert "NoneType" not in res.stderr and "(file)" not in res.stderr


def test_a_missing_file_is_named_once():
    res = ftl("estimate", "no-such-recipe.yaml")
    assert res.exit_code == 2, res.output
    err = " ".join(res.stderr.split())
    assert err.startswith("error: no-such-recipe.yaml: no such file; check the path (ftl init --list") and \
        err.count("no-such-recipe.yaml") == 1, err


def test_ctrl_c_is_called_ctrl_c():
    assert signal_words(signal.SIGINT) == "Ctrl-C" and signal_words(signal.SIGTERM) == "SIGTERM"


# ---------------------------------------------------------------------------------------------
# checks before anything starts


DATA = ROOT / "recipes" / "data"


def test_estimate_refuses_data_that_is_not_there(tmp_path):
    res = ftl("estimate", QUICK, "--set", f"data.path={tmp_path / 'nope.jsonl'}", "--json")
    assert res.exit_code == 2 and res.stdout == "", res.output
    assert "data.path" in res.stderr and "no such file or folder" in res.stderr and "num_examples" in res.stderr


def test_estimate_only_warns_when_the_recipe_gives_the_size(tmp_path):
    res = ftl("estimate", QUICK, "--set", f"data.path={tmp_path / 'nope.jsonl'}", "--set", "data.num_examples=1000",
              "--json")
    assert res.exit_code == 0, res.output
    d = json.loads(res.stdout)
    assert len(d["warnings"]) == 1 and "no such file" in d["warnings"][0] and "warning:" in res.stderr
    res = ftl("estimate", str(ROOT / "recipes" / "qwen2.5-0.5b-dapt.yaml"), "--json")  # its corpus/ is the user's
    assert res.exit_code == 0 and "data.num_tokens" in json.loads(res.stdout)["warnings"][0], res.output
    res = ftl("estimate", QUICK, "--json")
    assert res.exit_code == 0 and json.loads(res.stdout)["warnings"] == [], res.output


def test_estimate_refuses_data_it_cannot_read(monkeypatch):
    """(Tests run as root here, so the permission is denied by a stand-in for os.access.)"""
    monkeypatch.setattr(launch.os, "access", lambda path, mode: not str(path).endswith("alpaca.jsonl"))
    res = ftl("estimate", QUICK)
    assert res.exit_code == 2 and "cannot be read (permission denied)" in res.stderr, res.output


def test_estimate_refuses_wrong_columns_as_launch_does():
    args = [QUICK, "--set", f"data.path={DATA / 'pairs.jsonl'}"]
    est, dry = ftl("estimate", *args), ftl("launch", *args, "--dry-run")
    assert est.exit_code == dry.exit_code == 2, (est.output, dry.output)
    assert "found columns ['prompt', 'chosen', 'rejected']" in est.stderr
    assert est.stderr.split("error:")[1] == dry.stderr.split("error:")[1]


@pytest.fixture
def online(monkeypatch):
    """No offline flag and no proxy: the hub would be asked."""
    for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "FTL_OFFLINE", "HTTPS_PROXY", "https_proxy", "ALL_PROXY",
              "all_proxy"):
        monkeypatch.delenv(v, raising=False)

    def no_fetch(*a, **k):
        raise AssertionError("the hub was asked although it cannot be reached")

    monkeypatch.setattr(catalog, "_fetch_config", no_fetch)


def test_an_uncached_hub_id_fails_fast_when_the_hub_cannot_be_reached(online, monkeypatch):
    """A lookup or connection that hangs is abandoned after HUB_PROBE_S; the fetch (whose retries took 24 s) is
    never tried; the message says what to do."""

    def hang(*a, **k):
        time.sleep(30)

    monkeypatch.setattr(catalog.socket, "create_connection", hang)
    t = time.monotonic()
    with pytest.raises(catalog.UnknownModel) as e:
        catalog.resolve_model("Qwen/Qwen2.5-1.5B")
    assert time.monotonic() - t < 10  # HUB_PROBE_S (1.5 s), with room for a loaded machine
    msg = str(e.value)
    assert "cannot be reached" in msg and "Did you mean 'Qwen/Qwen2.5-0.5B'?" in msg
    assert "ftl models" in msg and "config.json" in msg


def test_a_refused_connection_fails_at_once(online, monkeypatch):
    def refuse(*a, **k):
        raise ConnectionRefusedError(111, "refused")

    monkeypatch.setattr(catalog.socket, "create_connection", refuse)
    res = ftl("estimate", QUICK, "--set", "model=someone/unknown-model")
    assert res.exit_code == 2 and "cannot be reached" in res.stderr, res.output


@pytest.mark.parametrize("typo", ["Qwen/Qwen2.5-1.5B", "qwen2.5-1.5b", "llama-3.1-8", "meta-llama/Llama-3.1-7B",
                                  "mistral-7", "gemma-2-9"])
def test_did_you_mean_offers_only_names_that_resolve(typo):
    with pytest.raises(catalog.UnknownModel) as e:
        catalog.resolve_model(typo)  # HF_HUB_OFFLINE=1 in tests
    m = re.search(r"Did you mean '([^']+)'\?", str(e.value))
    assert m, str(e.value)
    assert m.group(1) in catalog.model_names() and catalog.resolve_model(m.group(1)).origin == "catalog"


def test_optional_packages_are_checked_before_a_dry_run(monkeypatch):
    monkeypatch.setattr(packages, "installed", lambda module: False)
    for key, value, extra in (("train.report_to", "wandb", "wandb"), ("train.report_to", "tensorboard", "tensorboard")):
        res = ftl("launch", QUICK, "--set", f"{key}={value}", "--dry-run")
        assert res.exit_code == 2 and "dry run" not in res.stdout, res.output
        err = " ".join(res.stderr.split())
        assert f"{key} = '{value}'" in err and "pip install" in err and f"[{extra}]'" in err, err


def test_every_extra_named_is_in_pyproject():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for _modules, extra in packages.OPTIONAL.values():
        assert extra in extras, extra

