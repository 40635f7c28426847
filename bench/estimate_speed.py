"""Wall time of `ftl estimate` beside `accelerate estimate-memory` on the same local config.

Both run as fresh processes, as a user runs them (imports included). accelerate 1.15 refuses a
local folder (it asks the hub first), so its own functions are driven with that lookup replaced:
`verify_on_hub` answers with the local config, everything else is accelerate's code path.

Then a probed architecture (`--probed gemma3_text`, no analytic builder): the first estimate of a
fresh cache (it probes) beside the cached ones.

    .venv/bin/python bench/estimate_speed.py [--model llama-3.1-8b] [--repeat 5] [--probed gemma3_text]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

ACCELERATE = r"""
import sys, json, types
from pathlib import Path
import accelerate.commands.estimate as est
folder = sys.argv[1]
cfg = json.loads((Path(folder) / "config.json").read_text())
est.verify_on_hub = lambda repo, token=None: types.SimpleNamespace(config=cfg, library_name="transformers")
args = types.SimpleNamespace(model_name=folder, library_name="transformers", trust_remote_code=False,
                             dtypes=["float32", "float16", "int8", "int4"])
est.estimate_command(args)
"""


def timed(cmd: list[str], env: dict[str, str]) -> float:
    t = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="llama-3.1-8b", help="catalog name whose config is written to a local folder")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--probed", default="gemma3_text", help="a model_type without an analytic builder (default config)")
    args = ap.parse_args()

    from launcher.spec.catalog import models

    entry = models()[args.model]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "FTL_NO_GPU_DETECT": "1"}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / args.model
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps(entry["config"]))
        recipe = Path(tmp) / "r.yaml"
        recipe.write_text(f"name: bench\nmodel: {folder}\nmethod: full\ncluster: {{gpu: a100-80gb}}\n")
        ftl = [sys.executable, "-m", "launcher.cli", "estimate", str(recipe), "--json"]
        acc = [sys.executable, "-c", ACCELERATE, str(folder)]
        timed(ftl, env), timed(acc, env)  # warm the file cache
        t_ftl = [timed(ftl, env) for _ in range(args.repeat)]
        t_acc = [timed(acc, env) for _ in range(args.repeat)]
        first, cached = probed_times(Path(tmp), args.probed, args.repeat, env)
    f, a = statistics.median(t_ftl), statistics.median(t_acc)
    print(f"model: {args.model} (local config.json), {args.repeat} runs each, median wall time of a fresh process")
    print(f"ftl estimate --json           {f:7.3f} s")
    print(f"accelerate estimate-memory    {a:7.3f} s")
    print(f"ratio (accelerate / ftl)      {a / f:7.1f}x")
    print(f"probed {args.probed} (default config.json): first estimate {first:.3f} s (probes), cached {cached:.3f} s")


def probed_times(tmp: Path, model_type: str, repeat: int, env: dict[str, str]) -> tuple[float, float]:
    """(first, median cached) wall time of `ftl estimate` on a probed architecture, from an empty cache."""
    from transformers import AutoConfig

    folder = tmp / model_type
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(AutoConfig.for_model(model_type).to_dict()))
    recipe = tmp / "p.yaml"
    recipe.write_text(f"name: bench\nmodel: {folder}\nmethod: lora\ncluster: {{gpu: h100}}\n")
    env = {**env, "FTL_CACHE": str(tmp / "cache")}
    ftl = [sys.executable, "-m", "launcher.cli", "estimate", str(recipe), "--json"]
    first = timed(ftl, env)
    return first, statistics.median(timed(ftl, env) for _ in range(repeat))


if __name__ == "__main__":
    main()
