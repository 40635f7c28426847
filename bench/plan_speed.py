"""Wall time of a full `ftl plan` search (every candidate estimated) per shipped recipe, over the
shipped cluster/ profiles. Goal: under one second each.

    .venv/bin/python bench/plan_speed.py [--repeat 3] [--allow-method lora]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--allow-method", action="append", default=[])
    args = ap.parse_args()
    from launcher.core.errors import FtlError
    from launcher.estimate.search import plan
    from launcher.spec.recipe import load_profiles, load_recipe

    profiles, paths = load_profiles()
    print(f"{'recipe':32} {'candidates':>10} {'fit':>6} {'best of ' + str(args.repeat):>10}  chosen")
    for rp in sorted((ROOT / "recipes").glob("*.yaml")):
        r = load_recipe(rp)
        times, res, err = [], None, None
        for _ in range(args.repeat):
            t = time.perf_counter()
            try:
                res = plan(r, profiles, cluster_paths=paths, allow_methods=args.allow_method)
            except FtlError as e:
                err = str(e)
            times.append(time.perf_counter() - t)
        what = f"{res.chosen.label} ({res.chosen.profile})" if res else f"error: {err[:60]}"
        n = len(res.candidates) if res else 0
        f = len(res.fitting) if res else 0
        print(f"{rp.stem:32} {n:>10} {f:>6} {min(times):>9.3f}s  {what}")


if __name__ == "__main__":
    main()
