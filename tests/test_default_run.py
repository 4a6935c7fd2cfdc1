"""`python run.py` with no arguments, as a user on a fresh machine runs it, checked end to end."""

import json
import re

import pytest
import torch
import yaml

from tests.helpers import (
    epoch_records,
    read_jsonl,
    records_of,
    run_py,
    summary,
    wandb_config,
    wandb_history,
    wandb_records,
    wandb_run_id,
    wandb_runs,
)

# the default run trains ResNet-18 for 6 epochs at 56 px (~2 min on 2 cores): slow, run by CI
pytestmark = pytest.mark.slow


def test_terminal_shows_the_config_once_and_paths_whole(default_command):
    run_dir, proc = default_command
    assert proc.stdout.count("\nconfig\n") == 1 and "├── model" in proc.stdout
    # a path a user copies into the next command is one unbroken line, however long
    assert f"run finished: {run_dir}\n" in proc.stdout
    assert f"best checkpoint: {run_dir / 'checkpoints' / 'best.pt'}\n" in proc.stdout
    assert "starting fresh" not in proc.stdout  # resume=auto in a new folder: nothing to say
    assert "cut to" not in proc.stdout  # the default 6 epochs hold the 1-epoch warmup


@pytest.mark.slow
def test_one_epoch_quick_check_trains_with_a_shorter_warmup(tmp_path):
    # the README's quick check: the 1-epoch warmup of the default schedule fills the whole run
    proc = run_py("trainer.epochs=1", cwd=tmp_path)
    (run_dir,) = (tmp_path / "outputs").glob("*/*")
    assert [r["epoch"] for r in epoch_records(run_dir)] == [1]
    log = (run_dir / "run.log").read_text()  # the terminal wraps it at 80 columns
    assert log.count("does not fit in the whole run") == 1, log[-3000:]
    assert "cut to" in log and "half the run" in log
    assert "Traceback" not in proc.stderr


def test_default_job_reaches_95_percent_top1(default_run):
    best = summary(default_run)
    assert best["best/val/acc1"] >= 95.0, best
    epochs = epoch_records(default_run)
    assert [r["epoch"] for r in epochs] == list(range(1, len(epochs) + 1))
    for r in epochs:
        assert {"train/epoch_loss", "val/loss", "val/acc1", "val/acc5", "time/epoch_s"} <= r.keys()
    assert best["best/val/acc1"] == max(r["val/acc1"] for r in epochs)


def test_run_folder_describes_itself(default_run):
    config = yaml.safe_load((default_run / "config.yaml").read_text())
    assert config["model"]["name"] == "resnet18"
    assert config["data"]["dataset"]["_target_"] == "data.digits.digits"
    assert "${" not in (default_run / "config.yaml").read_text(), "config.yaml must be resolved"
    info = json.loads((default_run / "run_info.json").read_text())
    assert re.fullmatch(r"[0-9a-f]{40}", info["git"]["commit"])
    assert isinstance(info["git"]["dirty"], bool)
    assert info["versions"]["torch"] == torch.__version__.split("+")[0]
    assert (default_run / ".hydra" / "config.yaml").is_file()


def test_checkpoints_hold_the_full_state(default_run):
    folder = default_run / "checkpoints"
    epochs = epoch_records(default_run)
    kept = sorted(p.name for p in folder.glob("epoch_*.pt"))
    last_epochs = range(len(epochs) - 2, len(epochs) + 1)  # keep_last: 3
    assert kept == [f"epoch_{e:04d}.pt" for e in last_epochs]
    assert not list(folder.glob(".*")), "no temporary files may remain"

    last = torch.load(folder / "last.pt", weights_only=True)
    assert {
        "model",
        "optimizer",
        "scheduler",
        "scaler",
        "epoch",
        "step",
        "best",
        "rng",
    } <= last.keys()
    assert last["epoch"] == len(epochs) and last["step"] == epochs[-1]["step"]
    assert last["class_names"] == [str(d) for d in range(10)]
    assert isinstance(last["config"], dict) and last["config"]["model"]["name"] == "resnet18"
    assert last["wandb_run_id"] == wandb_run_id(wandb_records(wandb_runs(default_run)[0]))

    best = torch.load(folder / "best.pt", weights_only=True)
    assert best["epoch"] == summary(default_run)["best/epoch"]
    assert best["metrics"]["val/acc1"] == summary(default_run)["best/val/acc1"]


def test_wandb_run_records_config_metrics_and_best_checkpoint(default_run):
    (offline_run,) = wandb_runs(default_run)
    records = wandb_records(offline_run)
    config = wandb_config(records)
    assert config["model"]["name"] == "resnet18"
    assert config["optim"]["lr"] == 1e-3

    history = wandb_history(records)
    train_steps = [s for s, row in history.items() if "train/lr" in row]
    assert train_steps and all(s % 10 == 0 for s in train_steps)  # trainer.log_every: 10
    epochs = epoch_records(default_run)
    for r in epochs:
        assert history[r["step"]]["val/acc1"] == pytest.approx(r["val/acc1"])

    final_summary: dict = {}
    for s in records_of(records, "summary"):
        final_summary.update(s["update"])
    assert final_summary["best/val/acc1"] == pytest.approx(summary(default_run)["best/val/acc1"])
    # ResNet-18 with a 1-channel stem and 10 classes: 11.17 M parameters
    assert final_summary["model/params_m"] == pytest.approx(11.17, abs=0.01)
    assert 0.1 < final_summary["model/gmacs"] < 0.15  # 56 x 56 digits: 0.124

    artifacts = records_of(records, "artifact")
    # the model, and the table behind the class-count bar chart (engine/imbalance.py)
    (artifact,) = [a for a in artifacts if a["type"] == "model"]
    assert any(a["type"] == "run_table" for a in artifacts), [a["type"] for a in artifacts]
    assert [c["path"] for c in artifact["manifest"]["contents"]] == ["best.pt"]
    assert records_of(records, "exit")[0]["exit_code"] == 0
    assert records_of(records, "stats"), "system metrics are recorded"


def test_jsonl_has_the_same_keys_and_steps_as_wandb(default_run):
    history = wandb_history(wandb_records(wandb_runs(default_run)[0]))
    for record in read_jsonl(default_run):
        if "summary" in record:
            continue
        row = history[record["step"]]
        for key, value in record.items():
            if key != "step":
                assert row[key] == pytest.approx(value), key
