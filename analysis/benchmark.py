"""Training and inference speed of a config: the engine's own loop beside a bare PyTorch loop.

python analysis/benchmark.py                                    # resnet18 on digits, this device
python analysis/benchmark.py model=resnet50 data=cifar10 trainer.precision=bf16 data.batch_size=256
python analysis/benchmark.py trainer.channels_last=true +optim.fused=true benchmark.repeats=9
python analysis/benchmark.py benchmark.mode=data data.num_workers=8 data.pin_memory=true

Any run.py override sets what is measured; conf/benchmark.yaml adds the benchmark's own keys
(benchmark.mode, steps, repeats, warmup, compare, out) and turns W&B off (logger=none).

mode=train, in one process, on the same model, data, batch size, precision and device:
  engine   engine.loop.fit itself, built as run.py builds it, for `warmup` + `repeats` epochs of
           `steps` batches (limit_val_batches=1), with a logger that keeps the logged metrics in
           memory and a saver that writes nothing. An epoch's images/s is steps x batch size /
           its logged time/train_s (the engine's own clock, which ends in a host-device sync).
  bare     a fresh copy of the model (the engine's initial weights, its device, memory format,
           autocast dtype and torch.compile setting), the same optimizer and LR scheduler built
           the same way, the same loader: forward, loss, backward, optimizer.step, zero_grad,
           scheduler.step_update, and the loss read back every trainer.log_every updates (what
           a user's own loop logs). The engine does on top: the non-finite check
           (trainer.max_bad_steps), its BatchNorm snapshot, loss/top-1 sums, the progress bar.
  interleaved  one bare pass (the same `steps` batches, seeded as fit seeds the epoch) runs
           right after each engine epoch, in one process: engine, bare, engine, bare... so a
           load change on a shared machine hits both sides of a pair. `ratio` is the median
           of the per-pair engine/bare ratios; ratio_min..ratio_max is their spread.
  inference  engine.loop.evaluate on the val loader (as fit validates), and a bare
           torch.inference_mode() forward loop over the same batches, both with the model the
           bare loop trained; a repeat is `steps` val batches (the val loader cycled if shorter).
  Warm-up repeats are left out. Reported: images/s (median, min, max, quartiles over the
  repeats), engine/bare ratio (median over pairs, with its spread), peak memory per side, time
  to the engine's first completed optimizer step (from process start, /proc/self/stat; and from
  the call), the FLOPs of one training step (torch.utils.flop_counter: matmuls, convolutions,
  attention) and the TFLOP/s they make, and on a GPU of the PEAK_TFLOPS table the fraction of
  its dense peak.

mode=data: the train loader alone, `steps` batches a repeat, each moved to the device
(non_blocking, the run's memory format; synchronised at the end on CUDA). compare=true also
times the bare training step on one batch already on the device, and says which is slower.

The JSON (`benchmark.out`; default <Hydra output dir>/benchmark.json, which for this command
line is ./benchmark.json: analysis tools make no run folder) holds every number:
  mode, options {mode, steps, repeats, warmup, [compare], out}
  run          model, params, dataset, input_shape, batch_size, eval_batch_size,
               steps_per_repeat, precision, channels_last, compile, optimizer (class),
               optimizer_fused, optimizer_foreach (as built), num_workers, pin_memory, on_device
  a phase      images_per_s {median, min, max, q1, q3, per_repeat}, ms_per_batch,
               peak_memory_mb, tflops, fraction_of_peak; on the CPU the training phases also
               cpu_ms_per_step {median, per_repeat}: process CPU time between optimizer steps
  mode=train   train {engine, bare, ratio (median of the per-pair ratios), ratio_min,
               ratio_max, pair_ratios, ratio_of_medians, ratio_best (of the fastest repeats),
               cpu_ratio (bare / engine CPU ms per step; CPU only), timeline ([side, epoch,
               first step s, last step s] in the order they ran)}, inference {engine, bare,
               ratio, ratio_best}, time_to_first_step_s {from_process_start, from_call},
               flops {train_step, train_per_image, forward_per_image}, peak {dtype, tflops, note}
  mode=data    data, compute (a phase, or null without compare), bottleneck (data | compute),
               verdict
  always       memory_kind, notes, environment {device_type, device_name, cuda, cudnn,
               cpu_threads, stdout_is_terminal, load_average, command, git, versions}, config
               (run.py's composed config with the benchmark's trainer.epochs and limits)
On a shared CPU the load drifts; the pairs' spread says how far; cpu_ratio moves less with it
than wall time, and one torch thread (OMP_NUM_THREADS=1) keeps idle OpenMP threads
from spinning. Memory: CUDA, torch.cuda's peak
allocated bytes per phase; CPU, this process's peak resident set size per phase
(resource.getrusage ru_maxrss, its high-water mark reset through /proc/self/clear_refs where
Linux allows; DataLoader worker processes are not included). CPU speed depends on the threads
torch uses (OMP_NUM_THREADS; recorded) and on other load on the machine: compare numbers taken
under the same conditions.
"""

import gc
import json
import logging
import os
import platform
import re
import resource
import statistics
import sys
import tempfile
import time
from contextlib import nullcontext
from itertools import islice
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf, open_dict
from torch import nn

from analysis.cli import no_run_folder
from engine.checkpoint import NullSaver
from engine.logger import NullLogger

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parent.parent
MODES = ("train", "data")
CLEAR_REFS = "/proc/self/clear_refs"  # writing 5 resets the process's peak RSS
# Dense (no sparsity) peak TFLOP/s from NVIDIA's datasheets, matched in order against the lower-
# cased torch.cuda.get_device_name() ("NVIDIA H100 80GB HBM3" is the SXM part). fp32 is the
# CUDA-core rate, the others tensor cores; None: the GPU has no such tensor-core mode.
PEAK_TFLOPS = [
    (r"h100.*pcie", {"bf16": 756, "fp16": 756, "tf32": 378, "fp32": 51}),
    (r"h100.*nvl", {"bf16": 835, "fp16": 835, "tf32": 418, "fp32": 60}),
    (r"\bh100\b", {"bf16": 989, "fp16": 989, "tf32": 495, "fp32": 67}),
    (r"h200", {"bf16": 989, "fp16": 989, "tf32": 495, "fp32": 67}),  # also GH200
    (r"\ba100\b", {"bf16": 312, "fp16": 312, "tf32": 156, "fp32": 19.5}),
    (r"\bl40s\b", {"bf16": 362, "fp16": 362, "tf32": 183, "fp32": 91.6}),
    (r"\bl4\b", {"bf16": 121, "fp16": 121, "tf32": 60, "fp32": 30.3}),
    (r"rtx 4090", {"bf16": 165, "fp16": 165, "tf32": 82.6, "fp32": 82.6}),
    (r"v100.*pcie", {"bf16": None, "fp16": 112, "tf32": None, "fp32": 14}),
    (r"\bv100\b", {"bf16": None, "fp16": 125, "tf32": None, "fp32": 15.7}),
]


class MemoryLogger(NullLogger):
    """RunLogger's interface, keeping what fit logs in memory: `records` is [(step, metrics)]."""

    def __init__(self, after_epoch=None):
        self.records: list[tuple[int, dict]] = []
        self.summaries: dict = {}
        self.after_epoch = after_epoch  # called with the epoch's index once fit logged it

    def log(self, metrics: dict, step: int) -> None:
        self.records.append((step, dict(metrics)))
        if self.after_epoch is not None and "time/train_s" in metrics:
            self.after_epoch(self.epochs - 1)

    @property
    def epochs(self) -> int:
        """Epochs logged so far: fit logs an epoch's metrics once, after training it."""
        return sum("time/train_s" in metrics for _, metrics in self.records)

    def summary(self, values: dict) -> None:
        self.summaries.update(values)


def benchmark(
    cfg: DictConfig,
    mode: str = "train",
    steps: int = 50,
    repeats: int = 5,
    warmup: int = 1,
    compare: bool = True,
    out=None,
) -> dict:
    """Measure cfg (run.py's composed config) in `mode` (train | data); write the JSON to `out`
    (None: <Hydra output dir>/benchmark.json, or ./benchmark.json outside Hydra) and return it."""
    called = time.monotonic()
    if mode not in MODES:
        raise ValueError(f"benchmark.mode={mode!r}; choose one of {list(MODES)}")
    if steps < 1 or repeats < 1 or warmup < 0:
        raise ValueError(
            f"benchmark.steps={steps} and benchmark.repeats={repeats} must be 1 or more, "
            f"benchmark.warmup={warmup} 0 or more"
        )
    from engine.build import upgrade_config
    from engine.checks import check_config

    upgrade_config(cfg)  # old loss and mixup keys move to loss.* and mixup.*, as in run.py
    check_config(cfg)  # as run.py does first: a bad key or value fails before anything is built
    options = {"mode": mode, "steps": steps, "repeats": repeats, "warmup": warmup}
    if mode == "train":
        result = train_benchmark(cfg, steps, repeats, warmup, called)
    else:
        result = data_benchmark(cfg, steps, repeats, warmup, compare)
        options["compare"] = compare
    out = Path(out) if out is not None else _default_out()
    environment = _environment(result.pop("device"))
    result = {"mode": mode, "options": {**options, "out": str(out)}, **result}
    result["environment"] = environment
    _write_json(out, result)
    return result


def train_benchmark(cfg: DictConfig, steps: int, repeats: int, warmup: int, called: float):
    """mode=train: fit, the bare loop, inference; the module docstring says what each times."""
    from engine import build
    from engine.device import PRECISIONS, resolve_device
    from engine.rng import seed_everything

    device = resolve_device(cfg.trainer.device)
    seed_everything(cfg.seed)
    data = build.build_data(cfg)  # first: the run's length is cut to the loader's
    splits, train_loader, val_loader = data
    notes = []
    steps = _steps_per_epoch(steps, train_loader, notes)
    # the benchmarked run: warm-up + repeats epochs of `steps` batches, one val batch each
    trainer = {"epochs": warmup + repeats, "limit_train_batches": steps, "limit_val_batches": 1}
    cfg = OmegaConf.merge(cfg, {"trainer": trainer})
    updates = build.updates_per_epoch(cfg, train_loader)
    cfg = _without_long_warmup(cfg, updates, notes)
    batch = int(cfg.data.batch_size)
    amp_dtype = PRECISIONS.get(cfg.trainer.precision)  # fit itself rejects an unknown one
    memory_format = torch.channels_last if cfg.trainer.channels_last else torch.contiguous_format

    # (a) the engine: built as run.py builds it (build.training), trained by fit itself
    run = build.training(cfg, data=data)
    model, optimizer = run.model, run.optimizer
    # (b) the bare loop: a fresh copy of the engine's initial model, its own optimizer and
    # scheduler built the same way; one bare pass runs after each engine epoch (ABAB...), so
    # both see the same load on a shared machine
    bare = build.build_model(cfg, splits)
    bare.load_state_dict(model.state_dict())
    bare.to(device, memory_format=memory_format)
    bare_optimizer = build.build_optimizer(cfg, bare)
    bare_scheduler = build.build_scheduler(cfg, bare_optimizer, updates)
    bare_clock = _StepClock()
    bare_optimizer.register_step_post_hook(bare_clock)
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.loss.get("label_smoothing", 0.0))
    step = _bare_step(bare, bare_optimizer, criterion, amp_dtype, device, cfg.trainer)
    step = _as_user_script(step, bare_scheduler, cfg.trainer.log_every)
    one_epoch = _train_pass(train_loader, steps, cfg.seed, device, memory_format, step, bare_clock)
    first_step = {}

    def on_step(opt, args, kwargs):
        if not first_step:
            _sync(device)
            first_step.update(at=time.monotonic(), since_start=_process_age_s())

    pairs = _Interleaved(one_epoch, device)
    logger = MemoryLogger(after_epoch=pairs.bare_after_engine)
    engine_clock = _StepClock(lambda: logger.epochs)
    hooks = [optimizer.register_step_post_hook(h) for h in (on_step, engine_clock)]
    with logger:  # a saver that writes nothing
        run.fit(logger, NullSaver(Path(tempfile.gettempdir()) / "benchmark-checkpoints"))
    for hook in hooks:
        hook.remove()
    epochs = [m["time/train_s"] for _, m in logger.records if "time/train_s" in m]
    if len(epochs) != warmup + repeats:
        raise RuntimeError(
            f"fit logged time/train_s for {len(epochs)} epochs, expected {warmup + repeats}; "
            "the benchmark reads each epoch's training time from that key"
        )
    engine_rates = [steps * batch / s for s in epochs[warmup:]]
    bare_rates = pairs.rates[warmup:]
    del run, model, optimizer
    images, targets = next(iter(train_loader))
    images = images.to(device, memory_format=memory_format)
    flops = _count_flops(bare, criterion, images, targets.to(device), amp_dtype, device)
    run = _run_facts(cfg, splits, steps, val_loader.batch_size, bare, bare_optimizer)
    del one_epoch, step, bare_optimizer
    _free(device)

    # (c) inference, with the model the bare loop trained
    eval_kwargs = _evaluate_kwargs(cfg, device, amp_dtype)
    inference = _inference(bare, val_loader, steps, repeats, warmup, eval_kwargs, memory_format)

    peak, peak_dtype, peak_note = _peak_tflops(device, cfg.trainer.precision)
    train = {
        "engine": _phase(engine_rates, batch, pairs.peak["engine"], flops["train_step"], peak),
        "bare": _phase(bare_rates, batch, pairs.peak["bare"], flops["train_step"], peak),
    }
    train.update(_pair_ratios(engine_rates, bare_rates))
    train["timeline"] = _timeline({"engine": engine_clock, "bare": bare_clock})
    train["ratio_best"] = max(engine_rates) / max(bare_rates)
    if device.type == "cpu":
        # CPU seconds between optimizer steps: the work a step costs, whatever else the
        # machine runs (with one torch thread; idle OpenMP threads spin and add CPU time)
        for name, clock in (("engine", engine_clock), ("bare", bare_clock)):
            train[name]["cpu_ms_per_step"] = _cpu_ms_per_step(
                clock, range(warmup, warmup + repeats)
            )
        cpu = [train[k]["cpu_ms_per_step"]["median"] for k in ("engine", "bare")]
        train["cpu_ratio"] = cpu[1] / cpu[0] if None not in cpu else None
    eval_batch = val_loader.batch_size
    inference = {
        name: _phase(rates, eval_batch, mem, flops["forward_per_image"] * eval_batch, peak)
        for name, (rates, mem) in inference.items()
    }
    engine_inf, bare_inf = (inference[k]["images_per_s"] for k in ("engine", "bare"))
    inference["ratio"] = engine_inf["median"] / bare_inf["median"]
    inference["ratio_best"] = engine_inf["max"] / bare_inf["max"]
    return {
        "device": device,
        "run": run,
        "train": train,
        "inference": inference,
        "time_to_first_step_s": {
            "from_process_start": first_step.get("since_start"),
            "from_call": first_step["at"] - called if first_step else None,
        },
        "flops": flops,
        "peak": {"dtype": peak_dtype, "tflops": peak, "note": peak_note},
        "memory_kind": _memory_kind(device),
        "notes": notes + _train_notes(cfg),
        "config": build.plain(cfg),
    }


def data_benchmark(cfg: DictConfig, steps: int, repeats: int, warmup: int, compare: bool):
    """mode=data: images/s of the train loader moving batches to the device; with `compare`,
    of the bare training step on one batch already there, and a verdict."""
    from engine import build
    from engine.device import PRECISIONS, resolve_device
    from engine.rng import seed_everything

    device = resolve_device(cfg.trainer.device)
    seed_everything(cfg.seed)
    splits, train_loader, _ = build.build_data(cfg)
    notes = []
    steps = _steps_per_epoch(steps, train_loader, notes)
    batch = int(cfg.data.batch_size)
    memory_format = torch.channels_last if cfg.trainer.channels_last else torch.contiguous_format

    one_epoch = _train_pass(train_loader, steps, cfg.seed, device, memory_format)
    rates, memory = _timed(one_epoch, warmup, repeats, device)
    result = {
        "device": device,
        "run": _run_facts(cfg, splits, steps, None, None, None),
        "data": _phase(rates, batch, memory),
        "compute": None,
        "bottleneck": None,
        "verdict": None,
        "memory_kind": _memory_kind(device),
        "notes": notes,
        "config": build.plain(cfg),
    }
    if not compare:
        return result

    model = build.build_model(cfg, splits).to(device, memory_format=memory_format)
    optimizer = build.build_optimizer(cfg, model)
    result["run"] = _run_facts(cfg, splits, steps, None, model, optimizer)
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.loss.get("label_smoothing", 0.0))
    amp_dtype = PRECISIONS.get(cfg.trainer.precision)
    step = _bare_step(model, optimizer, criterion, amp_dtype, device, cfg.trainer)
    images, targets = next(iter(train_loader))
    images = images.to(device, memory_format=memory_format)
    targets = targets.to(device)

    def compute_epoch(epoch: int) -> int:
        for _ in range(steps):
            step(images, targets)
        return steps * images.shape[0]

    compute_rates, memory = _timed(compute_epoch, warmup, repeats, device)
    result["compute"] = _phase(compute_rates, batch, memory)
    loading, compute = _median(rates), _median(compute_rates)
    result["bottleneck"] = "data" if loading < compute else "compute"
    if loading < compute:
        verdict = (
            f"data-bound: the loader delivers {loading:,.0f} images/s, the training step "
            f"takes {compute:,.0f}; more data.num_workers, data.pin_memory or data.on_device "
            "would speed training up"
        )
    else:
        verdict = (
            f"compute-bound: the loader delivers {loading:,.0f} images/s, "
            f"{loading / compute:.1f}x the {compute:,.0f} the training step takes"
        )
    if not cfg.data.get("num_workers") and not cfg.data.get("on_device"):
        # no workers: loading and compute take turns in one process, so their times add up
        serial = 1 / (1 / loading + 1 / compute)
        verdict += f" (num_workers=0: the two take turns, about {serial:,.0f} images/s together)"
    result["verdict"] = verdict
    return result


def _timed(one_pass, warmup: int, repeats: int, device) -> tuple[list[float], float | None]:
    """(images/s of each repeat after `warmup` untimed ones, peak memory in MB) of
    `one_pass(index)`, which returns the images it processed; synchronised at both ends."""
    memory = _MemoryProbe(device)
    rates = []
    for i in range(warmup + repeats):
        _sync(device)
        t0 = time.perf_counter()
        images = one_pass(i)
        _sync(device)
        if i >= warmup:
            rates.append(images / (time.perf_counter() - t0))
    return rates, memory.peak_mb()


def _train_pass(loader, steps, seed, device, memory_format, step=None, clock=None):
    """one_pass(epoch) for _timed: the first `steps` batches of the epoch's order (seeded as
    fit seeds it), each moved to the device and, when given, trained on with `step`."""

    def one_pass(epoch: int) -> int:
        if clock is not None:
            clock.epoch = epoch
        _seed_epoch(loader, seed, epoch)
        seen = 0
        for images, targets in islice(loader, steps):
            images = images.to(device, non_blocking=True, memory_format=memory_format)
            targets = targets.to(device, non_blocking=True)
            if step is not None:
                step(images, targets)
            seen += images.shape[0]
        return seen

    return one_pass


class _Interleaved:
    """The bare loop's passes, one after each engine epoch (fit logs the epoch, then this runs):
    engine, bare, engine, bare... Each side's peak memory is its own (the probe is reset in
    between); the engine's includes its epoch's one validation batch."""

    def __init__(self, one_pass, device):
        self.one_pass, self.device = one_pass, device
        self.rates: list[float] = []
        self.peak = {"engine": None, "bare": None}
        self.memory = _MemoryProbe(device)

    def bare_after_engine(self, epoch: int) -> None:
        self._note_peak("engine")
        self.rates += _timed(lambda _: self.one_pass(epoch), 0, 1, self.device)[0]
        self._note_peak("bare")

    def _note_peak(self, side: str) -> None:
        mb = self.memory.peak_mb()
        if mb is not None:
            self.peak[side] = max(mb, self.peak[side] or 0.0)
        self.memory = _MemoryProbe(self.device)


def _as_user_script(step, scheduler, log_every: int):
    """The bare step as a user's own loop would run it: the LR schedule stepped per update
    (timm's step_update, as fit does) and the loss read back (a host sync) every `log_every`
    updates, fit's train/loss cadence."""
    updates = 0

    def user_step(images, targets):
        nonlocal updates
        loss = step(images, targets)
        updates += 1
        scheduler.step_update(num_updates=updates)
        if updates % log_every == 0:
            loss.item()

    return user_step


def _timeline(clocks: dict) -> list[list]:
    """[side, epoch, first step s, last step s] of every epoch and bare pass, in the order they
    ran, in seconds from the first: the record that the two sides took turns."""
    spans = [
        [side, epoch, times[0][0], times[-1][0]]
        for side, clock in clocks.items()
        for epoch, times in clock.times.items()
    ]
    spans.sort(key=lambda span: span[2])
    start = spans[0][2] if spans else 0.0
    return [[side, epoch, first - start, last - start] for side, epoch, first, last in spans]


def _pair_ratios(engine_rates: list[float], bare_rates: list[float]) -> dict:
    """engine / bare images/s of each (engine epoch, the bare pass right after it) pair: the
    median is `ratio`; min and max say how much one pair can be trusted."""
    ratios = [e / b for e, b in zip(engine_rates, bare_rates, strict=True)]
    return {
        "ratio": _median(ratios),
        "ratio_min": min(ratios),
        "ratio_max": max(ratios),
        "pair_ratios": ratios,
        "ratio_of_medians": _median(engine_rates) / _median(bare_rates),
    }


class _StepClock:
    """An optimizer step hook: (wall, process CPU) seconds at each step, by epoch.

    epoch_of: () -> the epoch a step belongs to; None: the `epoch` attribute, set by the loop.
    """

    def __init__(self, epoch_of=None):
        self.epoch_of = epoch_of
        self.epoch = 0
        self.times: dict[int, list[tuple[float, float]]] = {}

    def __call__(self, optimizer, args, kwargs) -> None:
        epoch = self.epoch_of() if self.epoch_of is not None else self.epoch
        self.times.setdefault(epoch, []).append((time.perf_counter(), time.process_time()))


def _cpu_ms_per_step(clock: _StepClock, epochs) -> dict:
    """Median and per-repeat CPU ms from an epoch's first step to its last, per step."""
    per_repeat = []
    for epoch in epochs:
        times = clock.times.get(epoch, [])
        if len(times) >= 2:
            per_repeat.append(1000 * (times[-1][1] - times[0][1]) / (len(times) - 1))
    return {"median": _median(per_repeat) if per_repeat else None, "per_repeat": per_repeat}


def _bare_step(model, optimizer, criterion, amp_dtype, device, trainer: DictConfig):
    """One plain training step on a batch already on the device, with the precision, the
    torch.compile and the cuDNN autotuning that `trainer` asks of the engine."""
    if device.type == "cuda" and trainer.get("cudnn_benchmark") is not None:
        torch.backends.cudnn.benchmark = bool(trainer.cudnn_benchmark)
    net = _compiled(model, trainer.get("compile"))
    net.train()
    autocast = (lambda: torch.autocast(device.type, dtype=amp_dtype)) if amp_dtype else nullcontext
    # fp16 needs loss scaling to train at all; bf16 and fp32 step the optimizer directly
    scaler = torch.amp.GradScaler(device.type) if trainer.precision == "fp16" else None

    def step(images, targets):
        with autocast():
            loss = criterion(net(images), targets)
        if scaler is None:
            loss.backward()
            optimizer.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        optimizer.zero_grad(set_to_none=True)
        return loss

    return step


def _inference(model, val_loader, steps, repeats, warmup, eval_kwargs, memory_format) -> dict:
    """{engine: (images/s per repeat, peak MB), bare: (...)}: `steps` val batches a repeat, as
    whole passes over the val loader and a last partial one (evaluate stops at its end)."""
    from engine.loop import evaluate

    device, amp_dtype = eval_kwargs["device"], eval_kwargs["amp_dtype"]
    length = len(val_loader)
    chunks = [length] * (steps // length) + ([steps % length] if steps % length else [])
    # the val loader reads in order: its first c batches hold min(c x batch, dataset) images
    size, batch = len(val_loader.dataset), val_loader.batch_size
    images_per_repeat = sum(min(c * batch, size) for c in chunks)
    criterion = nn.CrossEntropyLoss()

    def engine_pass(_) -> int:
        for chunk in chunks:
            evaluate(model, val_loader, criterion, num_batches=chunk, **eval_kwargs)
        return images_per_repeat

    def bare_pass(_) -> int:
        model.eval()
        autocast = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else nullcontext()
        with torch.inference_mode(), autocast:
            for chunk in chunks:
                for images, _ in islice(val_loader, chunk):
                    model(images.to(device, non_blocking=True, memory_format=memory_format))
        return images_per_repeat

    return {
        "engine": _timed(engine_pass, warmup, repeats, device),
        "bare": _timed(bare_pass, warmup, repeats, device),
    }


def _evaluate_kwargs(cfg: DictConfig, device, amp_dtype) -> dict:
    """evaluate's keyword arguments as fit passes them: device, autocast dtype, memory format,
    and each trainer key evaluate takes, by its name or with an `eval_` prefix (eval_hflip)."""
    import inspect

    from engine.loop import evaluate

    kwargs = {"device": device, "amp_dtype": amp_dtype, "channels_last": cfg.trainer.channels_last}
    takes = set(inspect.signature(evaluate).parameters)
    takes -= {"model", "loader", "criterion", "num_batches", "progress", *kwargs}
    for key, value in cfg.trainer.items():
        name = key.removeprefix("eval_")
        if name in takes:
            kwargs[name] = value
    return kwargs


def _compiled(model: nn.Module, setting):
    """The bare loop's model under trainer.compile as the engine reads it: false/null: eager;
    true: torch.compile(model); a string: its mode; a mapping: torch.compile's arguments."""
    if not setting:
        return model
    if setting is True:
        return torch.compile(model)
    if isinstance(setting, str):
        return torch.compile(model, mode=setting)
    return torch.compile(model, **OmegaConf.to_container(setting, resolve=True))


def _count_flops(model, criterion, images, targets, amp_dtype, device) -> dict:
    """FLOPs of one training step (forward + backward) on `images`, and of one image forward."""
    from torch.utils.flop_counter import FlopCounterMode

    autocast = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else nullcontext()
    model.train()
    with FlopCounterMode(display=False) as counter:
        with autocast:
            loss = criterion(model(images), targets)
        loss.backward()
    train_step = counter.get_total_flops()
    model.zero_grad(set_to_none=True)
    model.eval()
    with FlopCounterMode(display=False) as counter, torch.inference_mode(), autocast:
        model(images)
    forward = counter.get_total_flops()
    batch = images.shape[0]
    return {
        "train_step": train_step,
        "train_per_image": train_step // batch,
        "forward_per_image": forward // batch,
    }


def _peak_tflops(device: torch.device, precision: str):
    """(dense peak TFLOP/s of this GPU at the run's precision or None, its dtype, a note)."""
    if device.type != "cuda":
        return None, None, f"no peak table for {device.type}; TFLOP/s are given without a fraction"
    if precision in ("bf16", "fp16"):
        dtype = precision
    else:
        # fp32: cuDNN convolutions use TF32 tensor cores unless turned off (torch's default),
        # matmuls only with torch.set_float32_matmul_precision("high")
        tf32 = torch.backends.cudnn.allow_tf32 or torch.backends.cuda.matmul.allow_tf32
        dtype = "tf32" if tf32 else "fp32"
    name = torch.cuda.get_device_name(device)
    peak = peak_tflops(name, dtype)
    if peak is None:
        return None, dtype, f"no {dtype} peak for {name} in PEAK_TFLOPS (analysis/benchmark.py)"
    note = f"{name}: dense {dtype} peak {peak} TFLOP/s (NVIDIA datasheet)"
    if dtype == "tf32":
        note += "; an fp32 run with TF32 allowed, matmuls without it run at the fp32 rate"
    return peak, dtype, note


def peak_tflops(device_name: str, dtype: str) -> float | None:
    """The dense peak TFLOP/s of a GPU by its torch.cuda name, for bf16 | fp16 | tf32 | fp32;
    None for a GPU not in PEAK_TFLOPS or a dtype it has no tensor cores for."""
    for pattern, peaks in PEAK_TFLOPS:
        if re.search(pattern, device_name.lower()):
            return peaks[dtype]
    return None


def _phase(rates, batch, memory_mb, flops_per_step=None, peak=None) -> dict:
    median = _median(rates)
    quartiles = (
        statistics.quantiles(rates, n=4, method="inclusive") if len(rates) > 1 else [median] * 3
    )
    tflops = flops_per_step * median / batch / 1e12 if flops_per_step else None
    return {
        "images_per_s": {
            "median": median,
            "min": min(rates),
            "max": max(rates),
            "q1": quartiles[0],
            "q3": quartiles[2],
            "per_repeat": list(rates),
        },
        "ms_per_batch": 1000 * batch / median,
        "peak_memory_mb": memory_mb,
        "tflops": tflops,
        "fraction_of_peak": tflops / peak if tflops is not None and peak else None,
    }


def _median(values) -> float:
    return statistics.median(values)


def _steps_per_epoch(steps: int, loader, notes: list[str]) -> int:
    """`steps`, or the batches of one epoch of `loader` when fewer (fit stops at its end)."""
    if steps <= len(loader):
        return steps
    notes.append(
        f"benchmark.steps={steps}, but an epoch of the train loader has {len(loader)} batches: "
        f"{len(loader)} batches a repeat"
    )
    log.warning(notes[-1])
    return len(loader)


def _seed_epoch(loader, seed: int, epoch: int) -> None:
    from data.loaders import seed_epoch

    seed_epoch(loader, seed, epoch)


def _run_facts(cfg: DictConfig, splits, steps, eval_batch, model, optimizer) -> dict:
    """What was measured: the config's words, and the model and optimizer as built."""
    defaults = optimizer.defaults if optimizer is not None else {}
    return {
        "model": cfg.model.get("name"),
        "params": sum(p.numel() for p in model.parameters()) if model is not None else None,
        "dataset": str(cfg.data.dataset._target_),
        "input_shape": list(splits.val[0][0].shape),
        "batch_size": int(cfg.data.batch_size),
        "eval_batch_size": eval_batch,
        "steps_per_repeat": steps,
        "precision": cfg.trainer.precision,
        "channels_last": bool(cfg.trainer.channels_last),
        "compile": cfg.trainer.get("compile"),
        "optimizer": type(optimizer).__name__ if optimizer is not None else cfg.optim.get("opt"),
        # torch's own defaults when null: foreach on CUDA, the per-tensor loop on the CPU
        "optimizer_fused": defaults.get("fused"),
        "optimizer_foreach": defaults.get("foreach"),
        "num_workers": cfg.data.get("num_workers"),
        "pin_memory": cfg.data.get("pin_memory"),
        "on_device": cfg.data.get("on_device"),
    }


def _without_long_warmup(cfg: DictConfig, updates_per_epoch: int, notes: list[str]):
    """cfg, or cfg without LR warmup where the schedule's warmup would fill the benchmark's
    short run (the schedules refuse that); the LR does not change the speed."""
    from engine.schedules import warmup_updates

    sched = cfg.sched
    if "warmup_epochs" not in sched and "warmup_steps" not in sched:
        return cfg
    epochs, steps = sched.get("warmup_epochs", 0), sched.get("warmup_steps", 0)
    warmup = warmup_updates(epochs, steps, updates_per_epoch)
    total = updates_per_epoch * cfg.trainer.epochs
    if warmup < total:
        return cfg
    notes.append(
        f"sched.warmup_epochs={epochs} and sched.warmup_steps={steps} make a warmup of {warmup} "
        f"updates, not shorter than the benchmark's {total}: both set to 0 (the LR does not "
        "change the speed)"
    )
    return OmegaConf.merge(cfg, {"sched": {"warmup_epochs": 0, "warmup_steps": 0}})


def _train_notes(cfg: DictConfig) -> list[str]:
    """What the engine's epochs do that the bare loop does not, besides its own bookkeeping."""
    t = cfg.trainer
    extra = {
        "ema_decay": t.get("ema_decay") is not None,
        "mixup.mixup_alpha / cutmix_alpha": (cfg.mixup.get("mixup_alpha") or 0) > 0
        or (cfg.mixup.get("cutmix_alpha") or 0) > 0,
        "clip_grad_norm": t.get("clip_grad_norm") is not None,
        "accum_steps": (t.get("accum_steps") or 1) > 1,
    }
    on = [k for k, v in extra.items() if v]
    notes = [
        f"both: the LR scheduler stepped per update and the loss read back every "
        f"trainer.log_every={t.get('log_every')} updates; engine on top: the non-finite check "
        f"(trainer.max_bad_steps={t.get('max_bad_steps')}; null: off), the BatchNorm snapshot "
        "it restores from, the loss/top-1 sums, the progress bar, the stop-signal handling"
    ]
    if on:
        notes.append(f"engine only (the bare loop leaves them out): {', '.join(on)}")
    if t.get("eval_hflip"):
        notes.append(
            "trainer.eval_hflip: evaluate runs each image and its mirror; the bare forward once"
        )
    if t.get("compile"):
        notes.append(
            "trainer.compile: the bare loop compiles its copy with torch.compile; inference "
            "and the FLOP count use the eager model"
        )
    return notes


class _MemoryProbe:
    """Peak memory from construction to peak_mb(): CUDA allocated bytes, or the CPU process's
    peak RSS (its high-water mark reset where /proc/self/clear_refs allows it, else the
    process's peak so far)."""

    def __init__(self, device: torch.device):
        self.device = device
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        elif device.type == "cpu" and _rss_resettable():
            Path(CLEAR_REFS).write_text("5")  # 5: reset the peak RSS (Linux 4.0+)

    def peak_mb(self) -> float | None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        if self.device.type == "cpu":
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
        return None


def _rss_resettable() -> bool:
    return os.access(CLEAR_REFS, os.W_OK)


def _memory_kind(device: torch.device) -> str:
    if device.type == "cuda":
        return "cuda: torch.cuda.max_memory_allocated per phase"
    if device.type == "cpu":
        per = "per phase" if _rss_resettable() else "the process's peak so far (not resettable)"
        return (
            f"cpu: peak RSS of this process (resource.getrusage ru_maxrss), {per}; "
            "DataLoader workers not included"
        )
    return f"not measured on {device.type}"


def _process_age_s() -> float | None:
    """Seconds since this process started (Linux /proc; clock-tick resolution), else None."""
    try:
        stat = Path("/proc/self/stat").read_text()
        start_ticks = int(stat.rsplit(")", 1)[1].split()[19])  # field 22: starttime
        return time.clock_gettime(time.CLOCK_BOOTTIME) - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, AttributeError):
        return None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _free(device: torch.device) -> None:
    """Give a finished phase's GPU memory back, so the next phase's peak is its own."""
    if device.type == "cuda":
        gc.collect()  # modules can hold reference cycles
        torch.cuda.empty_cache()


def _default_out() -> Path:
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        return Path(HydraConfig.get().runtime.output_dir) / "benchmark.json"
    return Path("benchmark.json")


def _environment(device: torch.device) -> dict:
    from engine.runinfo import git_state, versions

    return {
        "device_type": device.type,
        "device_name": _device_name(device),
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if device.type == "cuda" else None,
        "cpu_threads": torch.get_num_threads(),  # OMP_NUM_THREADS, else the CPUs
        # fit's progress bar redraws 10 times a second in a terminal, and not at all in a pipe
        "stdout_is_terminal": sys.stdout.isatty(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "command": [sys.executable, *sys.argv],
        "git": git_state(REPO),
        "versions": versions(),  # torch, timm, ... as run folders record them
    }


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "cpu":
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
        except OSError:
            pass
        return platform.processor() or "cpu"
    return str(device)


def _write_json(path: Path, result: dict) -> None:
    from engine.runinfo import atomic_write_text

    path.parent.mkdir(parents=True, exist_ok=True)
    # default=str: torch.device and the like as text
    atomic_write_text(path, json.dumps(result, indent=2, default=str) + "\n")


def print_report(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(Console().width, 120))
    run, env = result["run"], result["environment"]
    title = (
        f"{run['model']} on {env['device_name']} ({env['device_type']}, {env['cpu_threads']} "
        f"CPU threads), batch {run['batch_size']}, {run['precision']}"
        f"{', channels_last' if run['channels_last'] else ''}, {run['steps_per_repeat']} "
        f"batches x {result['options']['repeats']} repeats after {result['options']['warmup']}"
    )
    table = Table(title=title)
    for column in ("phase", "images/s", "min - max", "IQR", "ms/batch", "peak MB", "TFLOP/s"):
        table.add_column(column, justify="left" if column == "phase" else "right", no_wrap=True)
    if result["mode"] == "train":
        phases = {
            "train: engine (fit)": result["train"]["engine"],
            "train: bare loop": result["train"]["bare"],
            "inference: engine (evaluate)": result["inference"]["engine"],
            "inference: bare forward": result["inference"]["bare"],
        }
    else:
        phases = {"data: loader -> device": result["data"]}
        if result["compute"] is not None:
            phases["train step, batch on device"] = result["compute"]
    for name, phase in phases.items():
        rate = phase["images_per_s"]
        tflops = phase.get("tflops")
        if tflops is not None and phase.get("fraction_of_peak") is not None:
            tflops_text = f"{tflops:.2f} ({100 * phase['fraction_of_peak']:.1f}%)"
        else:
            tflops_text = "-" if tflops is None else f"{tflops:.3f}"
        memory = phase["peak_memory_mb"]
        table.add_row(
            name,
            f"{rate['median']:,.1f}",
            f"{rate['min']:,.1f} - {rate['max']:,.1f}",
            f"{rate['q1']:,.1f} - {rate['q3']:,.1f}",
            f"{phase['ms_per_batch']:.2f}",
            "-" if memory is None else f"{memory:,.0f}",
            tflops_text,
        )
    console.print(table)
    if result["mode"] == "train":
        ttfs = result["time_to_first_step_s"]
        start = ttfs["from_process_start"]
        train, inference = result["train"], result["inference"]
        cpu = train.get("cpu_ratio")
        console.print(
            f"engine / bare: training {train['ratio']:.3f} (median of {len(train['pair_ratios'])}"
            f" engine-bare pairs, spread {train['ratio_min']:.3f}..{train['ratio_max']:.3f}; "
            f"fastest repeats {train['ratio_best']:.3f}"
            f"{'' if cpu is None else f', CPU time per step {cpu:.3f}'}), inference "
            f"{inference['ratio']:.3f} (fastest {inference['ratio_best']:.3f})\n"
            f"time to first step: "
            f"{'-' if start is None else f'{start:.2f} s'} from process start, "
            f"{ttfs['from_call']:.2f} s from the call\n"
            f"training step: {result['flops']['train_step'] / 1e9:.3f} GFLOP; peak: "
            f"{result['peak']['note']}"
        )
    elif result["verdict"]:
        console.print(result["verdict"])
    console.print(f"memory: {result['memory_kind']}")
    for note in result["notes"]:
        console.print(f"note: {note}")


@hydra.main(config_path="../conf", config_name="benchmark", version_base="1.3")
def main(cfg: DictConfig) -> None:
    options = cfg.benchmark
    run_cfg = cfg.copy()  # run.py's config: what the JSON records under "config"
    with open_dict(run_cfg):
        del run_cfg["benchmark"]
    result = benchmark(
        run_cfg,
        mode=options.mode,
        steps=options.steps,
        repeats=options.repeats,
        warmup=options.warmup,
        compare=options.compare,
        out=options.out,
    )
    print_report(result)
    print(f"wrote {result['options']['out']}")


if __name__ == "__main__":
    no_run_folder()
    main()
