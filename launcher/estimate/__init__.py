"""`ftl estimate`: pure arithmetic over a recipe (no torch): parameters, memory, FLOPs, time, cost."""

from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:  # keep `import launcher.estimate.arch` free of the whole estimator
    if name in {"Estimate", "estimate", "estimate_arch"}:
        from launcher.estimate import estimator

        return getattr(estimator, name)
    raise AttributeError(name)
