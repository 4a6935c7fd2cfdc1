"""Hyper-parameter search on top of run.py (random / Bayesian, pruned, resumable).

Not built yet: grids already work through Hydra's multirun, one folder and one W&B run per job:

    python run.py -m optim.lr=1e-3,1e-4 model=resnet18,resnet50
"""

import sys

MESSAGE = (
    "sweep.py: the search (Optuna TPE / random, pruning, resumable study) is not available yet.\n"
    "For a grid, use Hydra's multirun:  python run.py -m optim.lr=1e-3,1e-4 model=resnet18,resnet50"
)

if __name__ == "__main__":
    print(MESSAGE, file=sys.stderr)
    sys.exit(2)
