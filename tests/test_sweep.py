"""`python sweep.py`: an Optuna study over run.py trials, pruned, resumable, reported.

The trials are real run.py processes on 8x8 digits (TINY); the study is a real SQLite file.
"""

import contextlib
import csv
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from omegaconf import OmegaConf
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState

from sweeping import config as sweep_config
from sweeping.study import FINISHED, counts
from tests.helpers import (
    REPO,
    TINY,
    clean_env,
    epoch_records,
    records_of,
    wandb_records,
    wandb_runs,
)

pytestmark = pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")
SWEEP_PY = REPO / "sweep.py"
# one epoch's learning rate decides everything on TINY: >= 1e-3 learns (20-60 % top-1 after one
# epoch), <= 1e-4 stays at chance (10-12 %), which is what the median pruner must catch
LR_SPACE = "sweep.space={optim.lr: {type: float, low: 1.0e-7, high: 3.0e-2, log: true}}"


def sweep_py(*args: str, cwd: Path, check: bool = True, timeout: int = 900):
    proc = subprocess.run(
        [sys.executable, str(SWEEP_PY), *args],
        cwd=cwd,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"sweep.py {' '.join(args)} exited {proc.returncode}\n"
            f"--- stdout ---\n{proc.stdout[-4000:]}\n--- stderr ---\n{proc.stderr[-6000:]}"
        )
    return proc


def load_study(sweep_dir: Path) -> optuna.Study:
    return optuna.load_study(
        study_name=sweep_dir.name, storage=f"sqlite:///{sweep_dir / 'study.db'}"
    )


def states(study: optuna.Study) -> dict[str, int]:
    return counts(study)


# ---------------------------------------------------------------------------------------------
# configuration: every sweeps/ option, and the errors


@pytest.mark.parametrize("name", sweep_config.sweep_options())
def test_every_sweep_option_composes_with_run_config(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg, continuing = sweep_config.load_config([f"sweep={name}"])
    assert not continuing
    assert cfg.name == name
    assert not OmegaConf.missing_keys(cfg)  # sweeps/default.yaml gives every key a value
    sweep_config.check_run_config(
        cfg
    )  # every space key and choice is a run.py override that composes


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["sweep=nope"], "choose one of ['default'"),
        (["sweep.sampler=bayes"], "sweep.sampler='bayes'; choose one of ['tpe', 'random'"),
        (["sweep.pruner=early"], "sweep.pruner='early'; choose one of ['median'"),
        (
            ["sweep.pruner=hyperband"],
            "give the keyword arguments of optuna.pruners.HyperbandPruner",
        ),
        (["sweep.direction=up"], "sweep.direction='up'; choose 'maximize' or 'minimize'"),
        (["sweep.n_trialz=3"], "sweep.n_trialz is not a sweep setting"),
        (["sweep.n_trials=many"], "sweep.n_trials='many'"),
        (["sweep.space={}"], "sweep.space is empty"),
        (
            ["sweep.space={optim.lr: {type: log, low: 1, high: 2}}"],
            "sweep.space.optim.lr.type='log'",
        ),
        (
            ["sweep.space={optim.lr: {type: float, low: 0.1}}"],
            "sweep.space.optim.lr (float) lacks ['high']",
        ),
        (["sweep.space={optim.lr: {type: float, low: 0.1, high: 0.01}}"], "low <= high"),
        (["sweep.space={optim.lr: 0.1}"], "sweep.space.optim.lr=0.1 must be a mapping"),
        (["sweep.space={model: {type: categorical, choices: []}}"], "non-empty list"),
        (["-m"], "drop it"),
        (["sweep.overrides=trainer.epochs=3"], "sweep.overrides is a list"),
    ],
)
def test_bad_settings_name_the_value_and_the_fix(args, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(sweep_config.SweepError) as err:
        sweep_config.load_config(args)
    assert message in str(err.value)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["sweep.space={optim.lrr: {type: float, low: 1.0e-4, high: 1.0e-2}}"],
            "sweep.space.optim.lrr",
        ),
        (
            ["sweep.space={model: {type: categorical, choices: [resnet18, resnet19]}}"],
            "model/resnet19",
        ),
        (["trainer.epochz=3"], "sweep.overrides=['trainer.epochz=3']"),
    ],
)
def test_space_keys_and_overrides_run_py_cannot_take_stop_the_sweep_before_a_trial(
    args, message, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    cfg, _ = sweep_config.load_config(args)
    with pytest.raises(sweep_config.SweepError) as err:
        sweep_config.check_run_config(cfg)
    assert message in str(err.value)
    assert "run.py cannot take it" in str(err.value)


def test_command_line_error_exits_2_with_the_message_and_starts_nothing(tmp_path):
    proc = sweep_py("sweep.sampler=bayes", cwd=tmp_path, check=False)
    assert proc.returncode == 2
    assert "sweep.py: error: sweep.sampler='bayes'; choose one of" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "multirun").exists()


def test_a_continued_sweep_keeps_its_search(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg, _ = sweep_config.load_config(["sweep.dir=s", "trainer.epochs=2"])
    Path("s").mkdir()
    (Path("s") / "sweep.yaml").write_text(OmegaConf.to_yaml(cfg))

    again, continuing = sweep_config.load_config(
        ["sweep.dir=s", "trainer.epochs=2", "sweep.n_trials=50"]
    )
    assert continuing and again.n_trials == 50 and list(again.overrides) == ["trainer.epochs=2"]
    for args, message in [
        (
            ["sweep.dir=s", "sweep.metric=val/loss"],
            "sweep.metric='val/loss', but this sweep runs with 'val/acc1'",
        ),
        (["sweep.dir=s", "trainer.epochs=3"], "sweep.overrides="),
        (["sweep.dir=s", "sweep=model_lr"], "is a 'default' sweep"),
    ]:
        with pytest.raises(sweep_config.SweepError) as err:
            sweep_config.load_config(args)
        assert message in str(err.value)
    with pytest.raises(sweep_config.SweepError, match="needs an existing sweep"):
        sweep_config.load_config(["sweep.dir=elsewhere", "sweep.report_only=true"])


def test_values_reach_run_py_as_hydra_reads_them():
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    for value in ["resnet18", "1e-3", "it's", "a,b", "/tmp/x y/trial_0001", 1e-05, 3, True, None]:
        assert parser.parse_override(f"k={sweep_config.hydra_value(value)}").value() == value


# ---------------------------------------------------------------------------------------------
# real sweeps


@pytest.mark.slow  # a real training subprocess: keeps the default suite under 10 minutes
def test_parallel_trials_are_wandb_runs_in_one_group_and_the_report_is_written(tmp_path):
    sweep_dir = tmp_path / "sweep"
    t0 = time.perf_counter()
    proc = sweep_py(
        f"sweep.dir={sweep_dir}",
        "sweep.n_trials=2",
        "sweep.n_jobs=2",
        "sweep.sampler=random",
        "trainer.epochs=1",
        *TINY,
        cwd=tmp_path,
    )
    print(f"2 parallel trials: {time.perf_counter() - t0:.0f} s")

    study = load_study(sweep_dir)
    assert states(study)["complete"] == 2 and len(study.trials) == 2
    for trial in study.trials:
        run_dir = sweep_dir / f"trial_{trial.number:04d}"
        assert trial.user_attrs["run_dir"] == str(run_dir)
        best = max(r["val/acc1"] for r in epoch_records(run_dir))
        assert trial.value == pytest.approx(best)
        (offline_run,) = wandb_runs(run_dir)
        run = records_of(wandb_records(offline_run), "run")[0]
        assert run["run_group"] == sweep_dir.name  # the study's name
        assert run["tags"] == [f"trial-{trial.number}"]
        assert run["display_name"] == f"trial-{trial.number}"
    assert len({t.params["optim.lr"] for t in study.trials}) == 2

    for name in ("optimization_history", "intermediate_values", "param_importances"):
        assert (sweep_dir / f"{name}.png").stat().st_size > 1000
    rows = list(csv.DictReader((sweep_dir / "leaderboard.csv").open()))
    assert [r["state"] for r in rows] == ["COMPLETE", "COMPLETE"]
    assert float(rows[0]["value"]) >= float(rows[1]["value"])
    assert "leaderboard.csv" in proc.stdout and "COMPLETE" in proc.stdout

    # on demand: the report of a sweep, and a restart of a finished one runs nothing
    (sweep_dir / "leaderboard.csv").unlink()
    report = sweep_py(f"sweep.dir={sweep_dir}", "sweep.report_only=true", cwd=tmp_path)
    assert "2/2 finished" in report.stdout and (sweep_dir / "leaderboard.csv").is_file()
    again = sweep_py(f"sweep.dir={sweep_dir}", cwd=tmp_path)
    assert "2 of 2 trials finished, 0 to run" in again.stderr
    assert len(load_study(sweep_dir).trials) == 2


@pytest.mark.slow
def test_a_metric_run_py_does_not_log_stops_the_sweep(tmp_path):
    proc = sweep_py(
        f"sweep.dir={tmp_path / 's'}",
        "sweep.n_trials=3",
        "sweep.metric=val/acc2",
        "trainer.epochs=2",
        "logger=none",
        *TINY,
        cwd=tmp_path,
        check=False,
    )
    assert proc.returncode == 2
    assert "sweep.metric='val/acc2' is not logged by run.py" in proc.stderr
    assert "'val/acc1'" in proc.stderr  # what it could have been
    assert len(load_study(tmp_path / "s").trials) == 1


@pytest.mark.slow
def test_a_failed_trial_is_marked_fail_with_its_error_and_the_sweep_goes_on(tmp_path):
    sweep_dir = tmp_path / "s"
    sweep_py(
        f"sweep.dir={sweep_dir}",
        "sweep.n_trials=2",
        "sweep.sampler=random",
        "sweep.seed=8",  # draws fp17 (run.py refuses it), then fp32 twice
        "sweep.space={trainer.precision: {type: categorical, choices: [fp32, fp17]}}",
        "trainer.epochs=1",
        "logger=none",
        *TINY,
        cwd=tmp_path,
    )
    trials = load_study(sweep_dir).trials
    assert [(t.state, t.params["trainer.precision"]) for t in trials] == [
        (TrialState.FAIL, "fp17"),
        (TrialState.COMPLETE, "fp32"),
        (TrialState.COMPLETE, "fp32"),
    ]
    rows = {int(r["trial"]): r for r in csv.DictReader((sweep_dir / "leaderboard.csv").open())}
    assert rows[0]["note"] == (
        "run.py exited 1: ValueError: trainer.precision='fp17' must be one of fp32, bf16, fp16, "
        "e.g. trainer.precision=bf16"
    )


def _processes_of(run_dir: Path) -> list[int]:
    """The processes whose command line names `run_dir` (Linux /proc)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmdline = (proc / "cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            if str(run_dir) in cmdline:
                pids.append(int(proc.name))
    return pids


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_killed_sweep_continues_without_losing_or_repeating_a_trial_and_prunes(tmp_path):
    n_trials, epochs = 5, 3
    sweep_dir = tmp_path / "sweep"
    args = [
        f"sweep.dir={sweep_dir}",
        f"sweep.n_trials={n_trials}",
        "sweep.n_jobs=2",
        "sweep.sampler=random",
        "sweep.seed=6",  # draws lr 7.8e-3, 6.6e-6, 3.1e-3, 1.7e-7 first: good and hopeless ones
        LR_SPACE,
        "sweep.pruner=median",
        "sweep.pruner_args={n_startup_trials: 2, n_warmup_steps: 1}",  # from epoch 1 on
        f"trainer.epochs={epochs}",
        "logger=none",
        *TINY,
    ]
    t0 = time.perf_counter()
    first = subprocess.Popen(
        [sys.executable, str(SWEEP_PY), *args],
        cwd=tmp_path,
        env=clean_env(),
        stdout=subprocess.DEVNULL,
        stderr=open(tmp_path / "first.log", "w"),  # noqa: SIM115
    )
    # kill -9 once two trials have finished and the next ones are running
    try:
        running = []
        while time.perf_counter() - t0 < 600:
            assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            study = None
            if (sweep_dir / "study.db").is_file():
                with contextlib.suppress(KeyError):  # the study is not in it yet
                    study = load_study(sweep_dir)
            if study is not None:
                n = states(study)
                running = [t.number for t in study.trials if t.state == TrialState.RUNNING]
                if n["complete"] + n["pruned"] >= 2 and running:
                    # the report of a running sweep, on demand (no lock: it only reads)
                    live = sweep_py(
                        f"sweep.dir={sweep_dir}", "sweep.report_only=true", cwd=tmp_path
                    )
                    assert "RUNNING" in live.stdout and "COMPLETE" in live.stdout
                    break
            time.sleep(1)
    finally:
        first.send_signal(signal.SIGKILL)  # also when the wait above failed
    first.wait()
    t_kill = time.perf_counter() - t0
    # its trials die with it (PR_SET_PDEATHSIG): no run.py trains on unseen
    deadline = time.time() + 30
    while any(_processes_of(sweep_dir / f"trial_{n:04d}") for n in running):
        assert time.time() < deadline, "a killed sweep's trial kept running"
        time.sleep(0.5)
    before = load_study(sweep_dir).trials  # as the kill left them
    left_running = [t.number for t in before if t.state == TrialState.RUNNING]
    assert left_running, "the kill came after the sweep finished"
    finished_before = sum(t.state in FINISHED for t in before)

    second = sweep_py(*args[:1], cwd=tmp_path)  # sweep.dir alone: the saved settings
    t_total = time.perf_counter() - t0
    assert f"trials {left_running} were running when the sweep stopped" in second.stderr

    study = load_study(sweep_dir)
    trials = study.trials
    n = states(study)
    assert n["complete"] + n["pruned"] == n_trials
    assert [t.number for t in trials] == list(range(len(trials)))  # numbering continued
    # each interrupted trial failed and was run again once, with its parameters
    failed = [t for t in trials if t.state == TrialState.FAIL]
    assert sorted(t.number for t in failed) == left_running
    reruns = {RetryHeartbeatStaleTrialCallback.retried_trial_number(t): t for t in trials}
    for t in failed:
        assert reruns[t.number].params == t.params
        assert reruns[t.number].state in (TrialState.COMPLETE, TrialState.PRUNED)
    # no other parameters twice: the restarted sampler did not draw its first trials again
    originals = [
        t for t in trials if RetryHeartbeatStaleTrialCallback.retried_trial_number(t) is None
    ]
    assert len({t.params["optim.lr"] for t in originals}) == len(originals)
    assert len(trials) == n_trials + len(failed)
    # only what was missing ran after the restart
    assert len(trials) - len(before) == n_trials - finished_before

    pruned = [t for t in trials if t.state == TrialState.PRUNED]
    assert pruned, [(t.number, t.state.name, t.params) for t in trials]
    for t in pruned:
        run_dir = Path(t.user_attrs["run_dir"])
        assert len(epoch_records(run_dir)) < epochs
    for t in trials:
        if t.state == TrialState.COMPLETE:
            assert len(epoch_records(Path(t.user_attrs["run_dir"]))) == epochs
    rows = {int(r["trial"]): r for r in csv.DictReader((sweep_dir / "leaderboard.csv").open())}
    assert all("interrupted; re-run as trial" in rows[t.number]["note"] for t in failed)
    print(
        f"killed after {t_kill:.0f} s with {finished_before} finished and trials {left_running} "
        f"running; {n_trials} finished ({n['pruned']} pruned) after {t_total:.0f} s in all"
    )
