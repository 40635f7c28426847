"""constraints/: the pinned versions scripts/setup installs are the ones this suite runs with, and they
satisfy pyproject.toml's ranges (which carry upper bounds for the libraries that change their APIs)."""

from __future__ import annotations

import importlib.metadata as md
import re
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
BOUNDED = ("transformers", "trl", "peft", "accelerate", "deepspeed", "bitsandbytes")


def pins(name: str) -> dict[str, str]:
    out = {}
    for line in (ROOT / "constraints" / name).read_text().splitlines():
        if line and not line.startswith("#"):
            pkg, version = line.split("==")
            out[re.sub(r"[-_.]+", "-", pkg).lower()] = version
    return out


def requirements() -> list[Requirement]:
    deps = PYPROJECT["project"]["dependencies"] + PYPROJECT["project"]["optional-dependencies"]["test"]
    return [Requirement(d) for d in deps]


@pytest.mark.parametrize("file", ["cpu.txt", "cuda.txt"])
def test_every_dependency_is_pinned_within_its_range(file):
    p = pins(file)
    for req in requirements():
        key = re.sub(r"[-_.]+", "-", req.name).lower()
        assert key in p, f"{file}: {req.name} is not pinned"
        assert req.specifier.contains(Version(p[key]), prereleases=True), (file, str(req), p[key])


def test_the_breaking_libraries_have_upper_bounds():
    for req in requirements():
        if req.name in BOUNDED:
            assert any(s.operator == "<" for s in req.specifier), f"{req}: no upper bound"


def test_this_suite_runs_with_the_pinned_versions():
    """What .venv holds is what cpu.txt says (scripts/setup installed with it): the pins are tested here."""
    p = pins("cpu.txt")
    for req in requirements():
        key = re.sub(r"[-_.]+", "-", req.name).lower()
        assert md.version(req.name) == p[key], (req.name, md.version(req.name), p[key])
