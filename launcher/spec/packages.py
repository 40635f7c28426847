"""The optional packages a recipe can ask for beyond ftl's dependencies, and how to install each: checked where
the run trains (this machine before a local launch, dry runs too; every node in its pre-flight), without
importing them.
"""

from __future__ import annotations

import importlib.util
import sys
from typing import Any

from launcher.spec.recipe import PACKAGE_DIR

# (recipe key, value) -> (import names, any one will do; the extra of ftl's pyproject.toml that installs them)
OPTIONAL: dict[tuple[str, str], tuple[tuple[str, ...], str]] = {
    ("train.report_to", "wandb"): (("wandb",), "wandb"),
    ("train.report_to", "tensorboard"): (("tensorboard", "tensorboardX"), "tensorboard"),
    ("train.attn_implementation", "flash_attention_2"): (("flash_attn",), "flash-attn"),
    ("train.cross_entropy", "fused"): (("liger_kernel",), "liger"),
}


def installed(module: str) -> bool:
    """Whether `module` can be imported here, found without importing it."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def pip_line(extra: str) -> str:
    """The command that installs ftl's `extra` into the Python running ftl (from its source when ftl runs from
    one, as scripts/setup installs it)."""
    root = PACKAGE_DIR.parent
    target = f"-e '{root}[{extra}]'" if (root / "pyproject.toml").is_file() else f"'ftl[{extra}]'"
    return f"{sys.executable} -m pip install {target}"


def missing_packages(recipe: Any) -> list[str]:
    """One sentence (key, value, package, the pip line) per optional package the recipe needs and this Python lacks."""
    out = []
    for (key, value), (modules, extra) in OPTIONAL.items():
        section, field = key.split(".")
        if getattr(getattr(recipe, section), field) == value and not any(installed(m) for m in modules):
            out.append(f"{key} = {value!r} needs the {modules[0]} package, which is not installed: "
                       f"{pip_line(extra)} (or set {key} to another value)")
    return out
