"""The first hour of a new user (issue 16): ftl --version, ftl env, help without Python types and with examples
that run as written, ftl init, and messages that point at the right thing."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import typer
from typer.testing import CliRunner

from launcher import __version__
from launcher.cli import environment
from launcher.cli.commands import app

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
