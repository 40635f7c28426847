"""The house's one direction of dependencies (docs/architecture.md), checked on the code itself:

* the import-linter contracts in pyproject.toml (`lint-imports`): layers, the estimator's independence from
  the search, no training stack below the trainer;
* no launcher module imports another in a loop (module by module, inside packages too);
* no module imports a launcher module inside a function, except the few places listed in ALLOWED with why;
* `ftl estimate`, `ftl plan` and `ftl prices` run without importing torch, transformers, peft, deepspeed or httpx.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import grimp
import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "launcher"

# (importing module, imported module prefix) -> why it is imported inside a function.
ALLOWED = {
    ("launcher.cli.commands", "launcher.train"):
        "torch boundary: ftl merge/generate load the trainer (torch, transformers, peft) only when asked",
    ("launcher.cloud", "launcher.cloud.runpod"): "registry: a provider's client (httpx) loads when it is asked for",
    ("launcher.cloud", "launcher.cloud.lambda_cloud"): "registry: a provider's client (httpx) loads when it is asked for",
    ("launcher.cloud.prices", "launcher.cloud.http"):
        "httpx boundary: live prices need the HTTP client; `ftl prices` from the shipped snapshot does not",
}
# Inside the trainer, modules that import torch load when the training step needs them.
TRAINER = "launcher.train"
HEAVY = ("torch", "transformers", "peft", "deepspeed", "httpx")


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def function_imports(source: str, module: str) -> list[tuple[int, str]]:
    """(line, imported module) for every import of a launcher module inside a function of `source`, including
    importlib.import_module("launcher....") calls (f-strings count by their literal head)."""
    found: list[tuple[int, str]] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inside = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if in_function and isinstance(child, ast.Import):
                found.extend((child.lineno, a.name) for a in child.names if a.name.split(".")[0] == "launcher")
            elif in_function and isinstance(child, ast.ImportFrom) and child.level == 0 and child.module \
                    and child.module.split(".")[0] == "launcher":
                found.append((child.lineno, child.module))
            elif in_function and isinstance(child, ast.ImportFrom) and child.level > 0:
                base = module.rsplit(".", child.level)[0]
                if child.module:
                    found.append((child.lineno, f"{base}.{child.module}"))
                else:
                    found.extend((child.lineno, f"{base}.{a.name}") for a in child.names)
            elif in_function and isinstance(child, ast.Call) and getattr(child.func, "attr", None) == "import_module" \
                    and child.args:
                arg = child.args[0]
                head = arg.value if isinstance(arg, ast.Constant) else (
                    arg.values[0].value if isinstance(arg, ast.JoinedStr) and arg.values
                    and isinstance(arg.values[0], ast.Constant) else "")
                if str(head).startswith("launcher"):
                    found.append((child.lineno, str(head).rstrip(".")))
            visit(child, inside)

    visit(ast.parse(source), False)
    return found


def allowed(importer: str, imported: str) -> bool:
    if importer.startswith(TRAINER + ".") and imported.startswith(TRAINER):
        return True
    return any(importer == i and (imported == p or imported.startswith(p + ".")) for i, p in ALLOWED)


def test_import_contracts_hold():
    lint = Path(sys.executable).parent / "lint-imports"
    r = subprocess.run([str(lint)], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert "0 broken" in r.stdout and "3 kept" in r.stdout, r.stdout[-2000:]


def test_no_module_imports_another_in_a_loop():
    graph = grimp.build_graph("launcher", cache_dir=None)
    edges = {m: graph.find_modules_directly_imported_by(m) for m in graph.modules}
    # Tarjan's strongly connected components: any component of more than one module is a loop
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    loops: list[list[str]] = []
    sys.setrecursionlimit(max(10000, sys.getrecursionlimit()))

    def strong(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                loops.append(sorted(comp))

    for m in sorted(edges):
        if m not in index:
            strong(m)
    assert not loops, f"import loops: {loops}"


def test_launcher_modules_are_imported_at_the_top():
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        mod = module_name(path)
        for line, imported in function_imports(path.read_text(), mod):
            if not allowed(mod, imported):
                offenders.append(f"{path.relative_to(ROOT)}:{line} imports {imported} inside a function")
    assert not offenders, "\n".join(offenders) + "\n(move them to the top, or add them to ALLOWED with the reason)"


def test_the_checker_sees_imports_in_functions():
    src = ("import launcher.core\n"
           "def f():\n    from launcher.rundir import Run\n    import launcher.launch\n"
           "    importlib.import_module(f'launcher.train.{x}')\n"
           "class C:\n    def m(self):\n        from . import sibling\n")
    got = function_imports(src, "launcher.backends.base")
    assert [m for _, m in got] == ["launcher.rundir", "launcher.launch", "launcher.train", "launcher.backends.sibling"]
    assert not allowed("launcher.backends.base", "launcher.rundir")
    assert allowed("launcher.cli.commands", "launcher.train.merge")


LIGHT = """
import json, sys
sys.argv = ["ftl", *json.loads(sys.argv[1])]
from launcher.cli import main
try:
    main()
except SystemExit as e:
    code = e.code
heavy = sorted(m for m in sys.modules if m.split(".")[0] in {heavy})
print("HEAVY=" + json.dumps(heavy))
""".replace("{heavy}", repr(set(HEAVY)))


@pytest.mark.parametrize("argv", [
    ["estimate", "recipes/llama3-8b-qlora.yaml", "--json"],
    ["plan", "recipes/llama3-8b-qlora.yaml", "--json", "--top", "2"],
    ["prices", "--json"],
], ids=["estimate", "plan", "prices"])
def test_the_light_commands_import_no_training_stack_and_no_http(argv, tmp_path):
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "FTL_CACHE": str(tmp_path / "cache"),
           "FTL_CONFIG_DIR": str(tmp_path / "config"), "HF_HUB_OFFLINE": "1", "FTL_NO_GPU_DETECT": "1"}
    r = subprocess.run([sys.executable, "-c", LIGHT, json.dumps(argv)], cwd=ROOT, capture_output=True, text=True,
                       env=env, timeout=120)
    lines = [line for line in r.stdout.splitlines() if line.startswith("HEAVY=")]
    assert lines, r.stdout[-2000:] + r.stderr[-2000:]
    assert json.loads(lines[-1][len("HEAVY="):]) == [], f"ftl {' '.join(argv)} imported {lines[-1]}"
    body = r.stdout[: r.stdout.rindex("HEAVY=")]
    assert json.loads(body), "the command printed no JSON"  # it really ran


def test_provider_facts_cover_the_rented_providers():
    from launcher.spec.catalog import provider_facts
    from launcher.spec.recipe import RENTED

    facts = provider_facts()
    assert set(facts) == set(RENTED)
    for name, f in facts.items():
        assert {"api_url", "url_env", "key_env", "prices_path", "boot_seconds", "download_bandwidth_gbps"} <= set(f), name
