"""What the analysis tools' command lines share: run.py's config, but no run folder.

Each tool is `@hydra.main(config_path="../conf", config_name="config")`, so it takes run.py's
overrides (`python analysis/flops.py model=vit_base`). It only reads that config and prints or
writes what it was asked for, so `no_run_folder()` puts these overrides in front of the user's:
"""

import sys
from pathlib import Path

NO_RUN_FOLDER = [
    "hydra.run.dir=.",  # Hydra creates the run folder even when it writes nothing into it
    "hydra.output_subdir=null",  # no .hydra/ copy of the config
    "hydra/job_logging=console",  # rich console only; no <job name>.log
]


def no_run_folder() -> None:
    """Prepend NO_RUN_FOLDER to sys.argv; the user's own `hydra.run.dir=...` still wins."""
    sys.argv[1:1] = NO_RUN_FOLDER


# Where a tool writes what belongs to no run folder (lr_curve, browse_dataset, verify_dataset,
# curves of an online W&B run): under outputs/, where the tool runs, as run.py's run folders are.
# outputs/ is git-ignored, so a later run's run_info.json does not record the repo "dirty".
TOOL_OUT = Path("outputs") / "analysis"
