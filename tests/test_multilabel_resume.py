"""A multi-label run killed mid-epoch and resumed ends exactly as an uninterrupted one (CPU)."""

import signal

import pytest
import torch

from tests.helpers import epoch_records, read_jsonl, run_py
from tests.test_resume import resumed_from, start, wait_for

# 4 epochs of 4 updates on 16 px mosaics, a checkpoint after every update
SETTINGS = [
    "data=digits_multilabel",
    "loss=bce",
    "data.dataset.image_size=16",
    "data.dataset.train_images=256",
    "data.dataset.val_images=64",
    "data.batch_size=32",
    "mixup.mixup_alpha=0.4",  # the mixing draws must resume too
    "trainer.epochs=4",
    "trainer.limit_train_batches=4",
    "trainer.log_every=2",
    "trainer.checkpoint_every_updates=1",
    "sched.warmup_epochs=0",
    "logger=none",
]


@pytest.mark.slow  # three run.py processes (~1 min)
def test_multilabel_run_killed_mid_epoch_resumes_exactly(tmp_path):
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    run_py(*SETTINGS, f"hydra.run.dir={straight}", cwd=tmp_path)
    proc = start([*SETTINGS, f"hydra.run.dir={broken}"], tmp_path)
    wait_for(broken / "checkpoints" / "epoch_0001_batch_000002.pt", proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (broken / "checkpoints" / "epoch_0004.pt").exists(), "killed too late"
    run_py(*SETTINGS, f"hydra.run.dir={broken}", "resume=auto", cwd=tmp_path)
    assert "batches into the next" in resumed_from(broken)

    expected, got = epoch_records(straight), epoch_records(broken)
    assert [r["epoch"] for r in got] == [1, 2, 3, 4]
    for a, b in zip(expected, got, strict=True):
        keys = ["step", "train/epoch_loss", *(k for k in a if k.startswith("val/"))]
        assert "val/mAP" in keys and "val/OF1_top3" in keys
        assert {k: a[k] for k in keys} == {k: b[k] for k in keys}
    losses = [(r["step"], r["train/loss"]) for r in read_jsonl(straight) if "train/loss" in r]
    assert [(r["step"], r["train/loss"]) for r in read_jsonl(broken) if "train/loss" in r] == losses
    final_a = torch.load(straight / "checkpoints" / "last.pt", weights_only=True)
    final_b = torch.load(broken / "checkpoints" / "last.pt", weights_only=True)
    assert final_a["best"] == final_b["best"] and final_a["best"]["metric"] == "val/mAP"
    for name, tensor in final_a["model"].items():
        assert torch.equal(tensor, final_b["model"][name]), name
