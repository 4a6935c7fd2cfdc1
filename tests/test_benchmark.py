"""analysis/benchmark.py measures fit, a bare loop, inference and the loader, and writes it all.

Speed is measured, never asserted: these check the wiring and that every number is there.
"""

import json
import subprocess
import sys

import pytest
import torch
from hydra import compose, initialize_config_dir

from analysis.benchmark import MemoryLogger, benchmark, peak_tflops
from tests.helpers import REPO, clean_env

# a 0.4 M-parameter timm ResNet on 8x8 digits: a training step takes milliseconds
TINY_MODEL = [
    "model=timm",
    "model.name=test_resnet",
    "data.dataset.image_size=8",
    "data.batch_size=16",
]


def composed(*overrides: str):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose("benchmark", overrides=list(overrides))


@pytest.fixture
def one_thread():
    """One torch thread: two OpenMP threads spin against each other when the CPUs are busy
    (parallel test runs), which can make a step 40x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def rates_ok(phase: dict, repeats: int) -> None:
    rate = phase["images_per_s"]
    assert len(rate["per_repeat"]) == repeats
    assert all(r > 0 for r in rate["per_repeat"])
    assert rate["min"] <= rate["q1"] <= rate["median"] <= rate["q3"] <= rate["max"]
    assert rate["min"] == min(rate["per_repeat"]) and rate["max"] == max(rate["per_repeat"])
    assert phase["ms_per_batch"] > 0
    assert phase["peak_memory_mb"] > 0  # CPU: this process's peak RSS


def test_train_mode_reports_engine_bare_and_inference(tmp_path, one_thread):
    # fused AdamW passes through to torch; a warmup longer than the benchmark's 9 updates is cut
    cfg = composed(*TINY_MODEL, "+optim.fused=true", "sched.warmup_epochs=5")
    out = tmp_path / "sub" / "bench.json"
    result = benchmark(cfg, mode="train", steps=3, repeats=2, warmup=1, out=out)

    for phase in ("train", "inference"):
        rates_ok(result[phase]["engine"], repeats=2)
        rates_ok(result[phase]["bare"], repeats=2)
        assert result[phase]["ratio"] > 0 and result[phase]["ratio_best"] > 0
        assert result[phase]["engine"]["tflops"] > 0
        assert result[phase]["engine"]["fraction_of_peak"] is None  # no CPU peak table
    # engine epochs and bare passes take turns (warm-up included), one ratio per pair
    train = result["train"]
    sides = [side for side, *_ in train["timeline"]]
    assert sides == ["engine", "bare"] * 3
    assert [epoch for _, epoch, *_ in train["timeline"]] == [0, 0, 1, 1, 2, 2]
    assert len(train["pair_ratios"]) == 2
    assert train["ratio_min"] <= train["ratio"] <= train["ratio_max"]
    engine_rates = train["engine"]["images_per_s"]["per_repeat"]
    bare_rates = train["bare"]["images_per_s"]["per_repeat"]
    assert train["pair_ratios"] == [e / b for e, b in zip(engine_rates, bare_rates, strict=True)]
    # CPU: process CPU time between optimizer steps, one figure per repeat
    for name in ("engine", "bare"):
        cpu = result["train"][name]["cpu_ms_per_step"]
        assert len(cpu["per_repeat"]) == 2 and cpu["median"] > 0
    assert result["train"]["cpu_ratio"] > 0
    run = result["run"]
    assert run["steps_per_repeat"] == 3 and run["batch_size"] == 16 and run["eval_batch_size"] == 32
    assert run["optimizer"] == "AdamW" and run["optimizer_fused"] is True
    assert run["input_shape"] == [1, 8, 8] and run["params"] > 0
    flops = result["flops"]
    assert flops["train_step"] == flops["train_per_image"] * 16
    assert flops["train_per_image"] > flops["forward_per_image"] > 0  # backward costs more
    first = result["time_to_first_step_s"]
    assert 0 < first["from_call"] <= first["from_process_start"]
    assert result["peak"]["tflops"] is None and "cpu" in result["peak"]["note"]
    assert result["memory_kind"].startswith("cpu")
    # the run that was measured: warm-up + repeats epochs of `steps` batches
    assert result["config"]["trainer"]["epochs"] == 3
    assert result["config"]["trainer"]["limit_train_batches"] == 3
    assert result["config"]["sched"]["warmup_epochs"] == 0
    assert any("sched.warmup_epochs=5" in note for note in result["notes"])
    assert result["environment"]["device_type"] == "cpu" and "device" not in result
    assert result["environment"]["versions"]["torch"]
    assert result["options"] == {
        "mode": "train",
        "steps": 3,
        "repeats": 2,
        "warmup": 1,
        "out": str(out),
    }
    assert json.loads(out.read_text()) == json.loads(json.dumps(result, default=str))


def test_data_mode_caps_steps_at_an_epoch_and_names_the_bottleneck(tmp_path, one_thread):
    # 1,437 training images in batches of 256: 5 batches an epoch, fewer than steps=8
    cfg = composed(*TINY_MODEL, "data.batch_size=256")
    result = benchmark(cfg, mode="data", steps=8, repeats=2, warmup=1, out=tmp_path / "b.json")
    assert result["run"]["steps_per_repeat"] == 5
    assert any("benchmark.steps=8" in note for note in result["notes"])
    rates_ok(result["data"], repeats=2)
    rates_ok(result["compute"], repeats=2)
    assert result["bottleneck"] in ("data", "compute")
    assert result["verdict"].startswith(f"{result['bottleneck']}-bound")
    assert "num_workers=0" in result["verdict"]
    assert json.loads((tmp_path / "b.json").read_text())["verdict"] == result["verdict"]


def test_bad_options_name_the_key(tmp_path):
    cfg = composed(*TINY_MODEL)
    with pytest.raises(ValueError, match=r"benchmark.mode='fast'; choose one of"):
        benchmark(cfg, mode="fast", out=tmp_path / "b.json")
    with pytest.raises(ValueError, match=r"benchmark.steps=0"):
        benchmark(cfg, steps=0, out=tmp_path / "b.json")
    assert not (tmp_path / "b.json").exists()


def test_memory_logger_keeps_what_fit_logs():
    with MemoryLogger() as logger:
        logger.log({"train/loss": 1.0}, step=3)
        logger.summary({"best/val/acc1": 50.0})
        logger.log_checkpoint(None, name="x", metadata={})  # RunLogger's other calls: no-ops
    assert logger.records == [(3, {"train/loss": 1.0})]
    assert logger.summaries == {"best/val/acc1": 50.0}


@pytest.mark.parametrize(
    ("name", "dtype", "peak"),
    [
        ("NVIDIA H100 80GB HBM3", "bf16", 989),  # SXM
        ("NVIDIA H100 PCIe", "bf16", 756),
        ("NVIDIA H200", "bf16", 989),
        ("NVIDIA A100-SXM4-80GB", "tf32", 156),
        ("NVIDIA L4", "fp16", 121),
        ("Tesla V100-SXM2-16GB", "bf16", None),  # no bf16 tensor cores
        ("NVIDIA A10G", "bf16", None),  # not in the table (and not an A100 or A10)
    ],
)
def test_peak_table(name, dtype, peak):
    assert peak_tflops(name, dtype) == peak


@pytest.mark.slow  # a fresh interpreter imports torch, timm and torchvision: ~10 s
def test_command_line_writes_the_json(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "analysis" / "benchmark.py"),
            *TINY_MODEL,
            "benchmark.mode=data",
            "benchmark.compare=false",
            "benchmark.steps=2",
            "benchmark.repeats=2",
        ],
        cwd=tmp_path,
        env=clean_env(OMP_NUM_THREADS="1"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "wrote " in proc.stdout and "data: loader -> device" in proc.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["benchmark.json"]  # no run folder
    result = json.loads((tmp_path / "benchmark.json").read_text())
    assert result["mode"] == "data" and result["compute"] is None
    assert result["config"]["model"]["name"] == "test_resnet"
    assert "benchmark" not in result["config"]  # run.py's config; the options are apart
    assert result["config"]["logger"]["wandb"] is None  # conf/benchmark.yaml: logger=none
