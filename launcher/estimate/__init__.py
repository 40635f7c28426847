"""`ftl estimate`: pure arithmetic over a recipe (no torch): parameters, memory, FLOPs, time, cost.

`estimator.estimate_arch` prices one recipe under a resolved strategy; `search` resolves `strategy: auto`,
suggests what would make a recipe fit and searches plans (`ftl plan`), always through the estimator.
"""
