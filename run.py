"""Train an image classifier, and evaluate, use, export or serve what it learned.

python run.py                                   # ResNet-18 on the bundled digits, offline
python run.py model=convnext_base data=cifar10  # any model x any dataset
python run.py -m optim.lr=1e-3,1e-4             # one run per value, one W&B group
torchrun --nproc_per_node=4 run.py ...          # data-parallel: 4 processes, one run folder
python run.py resume=outputs/<date>/<time>      # continue a run where it stopped
python run.py task=eval task.ckpt=outputs/<date>/<time> task.split=val
python run.py task=predict task.inputs=photo.jpg
python run.py task=export                       # ONNX + safetensors of the newest run
python run.py task=serve task.port=8000         # POST an image, get the top-k JSON back
python run.py --cfg job                         # print the composed config, do nothing
"""

import logging
import os
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

# (imports are made inside the tasks so that --help and --cfg answer without loading torch)


def train(cfg: DictConfig) -> float:
    from analysis.flops import model_complexity
    from engine import build, distributed
    from engine.checks import check_config
    from engine.console import print_config_tree, print_summary
    from engine.runinfo import write_run_info

    build.upgrade_config(cfg)  # old loss and mixup keys move to loss.* and mixup.*
    check_config(cfg)  # a bad key, value or _target_ fails here, before anything is built
    distributed.check_started()
    main_process = distributed.is_main()  # under torchrun, rank 0 alone prints and writes
    cfg, run_dir, resume = build.resolve_run(cfg)
    run = build.training(cfg, run_dir, resume)
    if main_process:  # everything is built: this run starts, and its folder is written
        print_config_tree(cfg)
        write_run_info(run_dir, build.plain(cfg))

    with run.logger() as logger:
        saver = run.saver(logger)
        size = model_complexity(
            run.model, tuple(run.splits.val[0][0].shape)
        )  # one image, as loaded
        logger.summary({"model/params_m": size["params"] / 1e6, "model/gmacs": size["macs"] / 1e9})
        result = run.fit(logger, saver)
        if cfg.logger.log_best_checkpoint:
            best = {k: v for k, v in result.items() if k.startswith("best/")}
            logger.log_checkpoint(saver.best, name=f"model-{logger.run_id}", metadata=best)
    if main_process:
        print_summary(f"run finished: {run_dir}", {**result, "best checkpoint": saver.best})
    distributed.barrier()  # the processes finish a job together (the next multirun job starts)
    return result[f"best/{result['best/metric']}"]  # checkpoint.best_metric


def evaluate(cfg: DictConfig) -> float:
    from data.multilabel import is_multi_label
    from engine import build, distributed
    from engine.checks import check_config
    from engine.console import print_summary
    from engine.device import resolve_device
    from engine.evaluate import check_tta, evaluate_model, gather_shares, write_results
    from engine.runinfo import write_run_info

    check_config(cfg)
    check_tta(cfg.task.tta, cfg.task.topk_metrics)
    distributed.check_started()
    task = cfg.task
    trained = build.trained_for_task(cfg)  # task.ckpt's run, or model.weights / pretrained
    cfg, run_dir = build.config_for_trained(cfg, trained.config, "pretrained" in trained.info)
    # data-parallel (torchrun, a submitit job's tasks): each process scores its share of the
    # split, process 0 puts them together, writes the files and logs to W&B
    dataset, loader = build.build_eval_data(cfg, trained.classes, task.split)
    device = resolve_device(cfg.trainer.device)
    if is_multi_label(dataset):  # mAP, per-class AP, every label above task.threshold
        return _evaluate_multilabel(cfg, trained, dataset, loader, run_dir, device)
    share = evaluate_model(
        trained.model.to(device),
        loader,
        trained.classes,
        topk=task.topk,
        progress=distributed.is_main(),
        tta=task.tta,
        topk_metrics=tuple(task.topk_metrics),
    )
    results = gather_shares(share)
    if results is None:  # not process 0: wait for its files, finish the job together
        return distributed.from_main(None)
    write_run_info(run_dir, build.plain(cfg))
    files = write_results(results, dataset, run_dir / "eval", source=trained.source)
    with build.build_logger(cfg, run_dir, None, job_type="eval") as logger:
        logger.log_evaluation(results, dataset, trained.source, task.log_misclassified)
    print_summary(f"evaluated {trained.source} on {task.split}", {**results.metrics, **files})
    return distributed.from_main(results.metrics["eval/acc1"])


def _evaluate_multilabel(cfg, trained, dataset, loader, run_dir, device) -> float:
    """task=eval on multi-label data: engine/multilabel.py's metrics and files (eval/)."""
    from engine import build, distributed, multilabel
    from engine.console import print_summary
    from engine.evaluate import evaluate_model, sample_paths
    from engine.runinfo import write_run_info

    task, main_process = cfg.task, distributed.is_main()
    share = evaluate_model(trained.model.to(device), loader, trained.classes, progress=main_process)
    settings = (trained.classes, task.get("threshold", 0.5), task.topk)
    results = multilabel.gather_evaluation(share.logits, share.targets, *settings)
    if results is None:  # not process 0: wait for its files, finish the job together
        return distributed.from_main(None)
    write_run_info(run_dir, build.plain(cfg))
    paths = sample_paths(dataset)
    files = multilabel.write_evaluation(results, paths, run_dir / "eval", trained.source)
    with build.build_logger(cfg, run_dir, None, job_type="eval") as logger:
        multilabel.log_evaluation(logger, results, dataset, trained.source, task.log_misclassified)
    print_summary(f"evaluated {trained.source} on {task.split}", {**results.metrics, **files})
    return distributed.from_main(results.metrics["eval/mAP"])


def predict(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    from engine import build, distributed
    from engine.checks import check_config
    from engine.device import resolve_device
    from engine.predict import Classifier, image_files, print_predictions, write_predictions

    distributed.require_one_process("predict")  # how it was launched, before what it was given
    check_config(cfg)
    task = cfg.task
    threshold = task.get("threshold", 0.5)  # multi-label models: labels at or above it
    trained, device = build.trained_for_task(cfg), resolve_device(task.device)
    classifier = Classifier(trained, device=device, threshold=threshold, min_score=task.min_score)
    files = image_files(task.inputs)
    results = classifier.predict(files, topk=task.topk, batch_size=task.batch_size)
    out = task.out or f"{HydraConfig.get().runtime.output_dir}/predictions.json"
    print_predictions(files, results)
    print(f"wrote {write_predictions(files, results, out)}")


def export(cfg: DictConfig) -> None:
    from engine import build, distributed
    from engine.checks import check_config
    from engine.export import export as export_model

    distributed.require_one_process("export")  # how it was launched, before what it was given
    check_config(cfg)
    task = cfg.task
    trained = build.trained_for_task(cfg)  # task.ckpt's run, or model.weights / pretrained
    no_run = "pretrained" in trained.info  # no run folder to write into: this job's folder
    run_cfg, job_dir = build.config_for_trained(cfg, trained.config, no_run)
    check = build.validation_images(run_cfg, trained.classes, task.check_images)
    out = task.out or (job_dir if no_run else trained.source.parent.parent) / "export"
    formats = {k: task[k] for k in ("formats", "opset", "atol", "output")}
    for path in export_model(trained, out, **formats, check_inputs=check):
        print(f"wrote {path}")


def serve(cfg: DictConfig) -> None:
    from engine import build, distributed
    from engine.checks import check_config
    from engine.device import resolve_device
    from engine.predict import Classifier
    from engine.serve import serve as serve_http

    distributed.require_one_process("serve")  # how it was launched, before what it was given
    check_config(cfg)
    task = cfg.task
    threshold = task.get("threshold", 0.5)  # multi-label models: labels at or above it
    trained, device = build.trained_for_task(cfg), resolve_device(task.device)
    classifier = Classifier(trained, device=device, threshold=threshold, min_score=task.min_score)
    limits = ("topk", "max_bytes", "max_pixels", "max_decodes", "decode_wait_s")
    serve_http(classifier, host=task.host, port=task.port, **{k: task[k] for k in limits})
    # The server has stopped cleanly. Leave without the interpreter's teardown: handler threads
    # of idle keep-alive connections (daemons) and torch's native thread pools can race it and
    # abort the process ("terminate called without an active exception", status -6).
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def calibrate(cfg: DictConfig) -> float:
    """Temperature scaling fitted on task.split (conf/task/calibrate.yaml); returns T."""
    from engine import build, distributed
    from engine.calibration import calibrate as fit_and_store
    from engine.checks import check_config
    from engine.console import print_summary
    from engine.device import resolve_device
    from engine.evaluate import evaluate_model

    distributed.require_one_process("calibrate")
    check_config(cfg)
    task = cfg.task
    trained = build.trained_for_task(cfg)
    run_cfg, run_dir = build.config_for_trained(cfg, trained.config, "pretrained" in trained.info)
    _, loader = build.build_eval_data(run_cfg, trained.classes, task.split)
    model = trained.model.to(resolve_device(run_cfg.trainer.device))
    evaluation = evaluate_model(model, loader, trained.classes)
    summary = fit_and_store(evaluation.logits, evaluation.targets, trained.source, run_dir)
    print_summary(f"calibrated {trained.source} on {task.split}", summary)
    return summary["temperature"]


TASKS = {
    "train": train,
    "eval": evaluate,
    "predict": predict,
    "export": export,
    "serve": serve,
    "calibrate": calibrate,
}


REPO = os.path.dirname(os.path.abspath(__file__))


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig):
    if REPO not in sys.path:
        # submitit starts a job as `python -m submitit.core._submit` in the launching folder;
        # the repo's packages are found from here wherever that is
        sys.path.insert(0, REPO)
    joined = False
    if os.environ.get("SUBMITIT_EXECUTOR"):
        from engine import distributed

        joined = distributed.join_job()  # a job of several tasks: its own process group
    try:
        return TASKS[cfg.task.name](cfg)
    except BaseException as err:
        failed(err)
        raise
    finally:
        if joined:
            distributed.stop()


def failed(err: BaseException) -> None:
    """A job failed: no run folder if it wrote nothing, and the message alone (exit status 1)
    for a mistake the user can fix; a bug keeps Hydra's traceback (engine/errors.py)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from engine.errors import JobFailed, discard_unused_folder, is_user_error

    hydra, user_error = HydraConfig.get(), is_user_error(err)
    if hydra.mode == RunMode.MULTIRUN:
        # Hydra keeps a failed job's exception for the end of the sweep (the stderr of
        # `run.py -m`, far from a SLURM job's folder): write it into the job's run.log too
        if isinstance(err, Exception):
            logging.getLogger("run").error(
                "job %s failed: %s: %s",
                hydra.job.num,
                type(err).__name__,
                err,
                exc_info=None if user_error else err,
            )
        if user_error and os.environ.get("HYDRA_FULL_ERROR") != "1":
            raise JobFailed(f"{type(err).__name__}: {err}") from err
        return
    if int(os.environ.get("RANK", 0)) == 0:  # under torchrun the processes share one folder
        discard_unused_folder(Path(hydra.runtime.output_dir), hydra.job.name)
    if user_error and os.environ.get("HYDRA_FULL_ERROR") != "1":
        print(f"{type(err).__name__}: {err}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:
        # started by torchrun: join the process group before Hydra picks the run folder, so that
        # all processes agree on it (engine/distributed.py)
        from engine import distributed

        sys.argv += distributed.start()
        try:
            main()
        finally:
            distributed.stop()
    else:
        main()
