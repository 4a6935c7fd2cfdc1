"""Hyper-parameter search on top of run.py: random or Bayesian (Optuna TPE), pruned, resumable.

python sweep.py                                        # sweeps/default.yaml
python sweep.py sweep=default sweep.n_trials=40 sweep.n_jobs=2 trainer.epochs=10
python sweep.py sweep.dir=multirun/sweeps/<name>-<time>     # continue a killed sweep
python sweep.py sweep.dir=multirun/sweeps/<name>-<time> sweep.report_only=true
python sweep.py sweep.storage=postgresql://host/db sweep.study=<name>  # one more worker

`sweep=<name>` picks sweeps/<name>.yaml (or a .yaml path); `sweep.<key>=<value>` sets one of
its keys (SweepConfig below); anything else is a run.py override for every trial. Each trial is
a real `python run.py ...` in <sweep folder>/trial_NNNN: its own run folder and W&B run, in a W&B
group named after the study, tagged trial-N. The study lives in a database (<sweep
folder>/study.db unless sweep.storage names one), so a killed sweep continues where it stopped:
the trials it was running are run again, and only the trials still missing are started.

The code is in sweeping/: config (settings and checks), study (the Optuna database), trials
(the run.py subprocesses), report (leaderboard and figures), cli (this command).
"""

import sys

from sweeping.cli import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], usage=__doc__))
