"""`python run.py -m optim.lr=1e-3,1e-4`: one folder and one W&B run per job, one W&B group."""

import yaml

from tests.helpers import (
    TINY,
    records_of,
    run_py,
    wandb_config,
    wandb_records,
    wandb_run_id,
    wandb_runs,
)


def test_multirun_gives_each_job_a_folder_and_a_wandb_run_in_one_group(tmp_path):
    sweep = tmp_path / "sweep"
    run_py(
        "-m",
        "optim.lr=1e-3,1e-4",
        f"hydra.sweep.dir={sweep}",
        "trainer.epochs=1",
        *TINY,
        cwd=tmp_path,
    )

    jobs = sorted(p for p in sweep.iterdir() if p.is_dir() and p.name.isdigit())
    assert [j.name for j in jobs] == ["0", "1"]
    lrs, ids, groups = [], [], []
    for job in jobs:
        assert (job / "checkpoints" / "last.pt").is_file()
        assert (job / "metrics.jsonl").is_file()
        lrs.append(yaml.safe_load((job / "config.yaml").read_text())["optim"]["lr"])
        (offline_run,) = wandb_runs(job)
        records = wandb_records(offline_run)
        assert wandb_config(records)["optim"]["lr"] == lrs[-1]
        ids.append(wandb_run_id(records))
        groups.append(records_of(records, "run")[0].get("run_group"))
    assert lrs == [1e-3, 1e-4]
    assert len(set(ids)) == 2
    assert groups[0] and groups[0] == groups[1]
