"""What runs on every node of a multi-node launch (SLURM, SSH, rented): pre-flight, then the node's trainers.

`python -m launcher.agent --run-dir RUN_DIR` (launcher.agent.node). It imports no backend and no provider:
a node needs the run directory, the renderer of its launch line and torch, nothing of the control plane.
"""
