"""Train an image classifier: `python run.py [group=option ...] [key=value ...]`.

python run.py                                   # ResNet-18 on the bundled digits, offline
python run.py model=convnext_base data=cifar10  # any model x any dataset
python run.py -m optim.lr=1e-3,1e-4             # one run per value, one W&B group
python run.py resume=outputs/<date>/<time>      # continue a run where it stopped
python run.py --cfg job                         # print the composed config, do nothing
"""

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float:
    # imported here so that --help and --cfg answer without loading torch
    from analysis.flops import model_complexity
    from engine import build
    from engine.console import print_config_tree, print_summary
    from engine.loop import fit, resolve_device
    from engine.rng import seed_everything
    from engine.runinfo import write_run_info

    cfg, run_dir, resume = build.resolve_run(cfg)
    print_config_tree(cfg)
    seed_everything(cfg.seed)
    splits, train_loader, val_loader = build.build_data(cfg)
    model = build.build_model(cfg, splits).to(resolve_device(cfg.trainer.device))
    optimizer = build.build_optimizer(cfg, model)
    scheduler = build.build_scheduler(cfg, optimizer, build.updates_per_epoch(cfg, train_loader))
    write_run_info(run_dir, build.plain(cfg))

    with build.build_logger(cfg, run_dir, resume) as logger:
        saver = build.build_saver(cfg, run_dir, splits.classes, logger.run_id)
        size = model_complexity(model, tuple(splits.val[0][0].shape))  # one image, as loaded
        logger.summary({"model/params_m": size["params"] / 1e6, "model/gmacs": size["macs"] / 1e9})
        result = fit(
            model,
            train_loader,
            val_loader,
            optimizer,
            scheduler,
            logger,
            saver,
            seed=cfg.seed,
            num_classes=len(splits.classes),
            resume=resume,
            **cfg.trainer,
        )
        if cfg.logger.log_best_checkpoint:
            best = {k: v for k, v in result.items() if k.startswith("best/")}
            logger.log_checkpoint(saver.best, name=f"model-{logger.run_id}", metadata=best)
    print_summary(f"run finished: {run_dir}", {**result, "best checkpoint": saver.best})
    return result["best/val/acc1"]


if __name__ == "__main__":
    main()
