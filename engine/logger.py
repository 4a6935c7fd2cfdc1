"""The one metrics sink: a W&B run and a local JSON-lines file with the same keys and steps."""

import json
import logging
import math
from pathlib import Path

from engine.files import atomic_write_text

log = logging.getLogger(__name__)


class RunLogger:
    """`log(metrics, step)` writes to <run folder>/metrics.jsonl and, when enabled, to W&B.

    Use as a context manager: on an exception the W&B run is closed and marked failed.
    """

    def __init__(
        self,
        run_dir: Path,
        config: dict,
        wandb_init: dict | None = None,
        resume_id: str | None = None,
        resume_step: int | None = None,
    ):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl_path = self.run_dir / "metrics.jsonl"
        if resume_step is not None:
            _truncate_jsonl(self.jsonl_path, resume_step)
        # line-buffered, so a kill loses at most the line being written; closed in close()
        self._jsonl = open(self.jsonl_path, "a", buffering=1)  # noqa: SIM115
        self.wandb_run = None
        if wandb_init is not None:
            import wandb

            self.wandb_run = wandb.init(
                dir=str(self.run_dir),
                config=config,
                id=resume_id,
                resume="allow" if resume_id else None,
                **wandb_init,
            )

    @property
    def run_id(self) -> str | None:
        return self.wandb_run.id if self.wandb_run else None

    def log(self, metrics: dict, step: int) -> None:
        self._jsonl.write(jsonl_line({"step": step, **metrics}))
        if self.wandb_run:
            self.wandb_run.log(metrics, step=step)

    def summary(self, values: dict) -> None:
        """Values that describe the whole run (best metric, model size): W&B summary + jsonl."""
        self._jsonl.write(jsonl_line({"summary": values}))
        if self.wandb_run:
            self.wandb_run.summary.update(values)

    def log_checkpoint(self, path: Path, name: str, metadata: dict) -> None:
        if self.wandb_run is None or not path.is_file():
            return
        import wandb

        artifact = wandb.Artifact(name=name, type="model", metadata=metadata)
        # immutable: W&B references the file instead of copying it to its staging folder
        artifact.add_file(str(path), name=path.name, policy="immutable")
        self.wandb_run.log_artifact(artifact, aliases=["best", "latest"])

    def log_evaluation(self, evaluation, dataset, source, log_misclassified: int = 64) -> None:
        """An evaluation (engine.evaluate.Evaluation): its metrics in the summary and, in W&B,
        the confusion matrix, the per-class table and a table of the first `log_misclassified`
        wrong predictions with their images."""
        self.summary({**evaluation.metrics, "eval/checkpoint": str(source)})
        if self.wandb_run is None:
            return
        import wandb

        from data.images import to_picture

        classes = evaluation.classes
        preds = evaluation.preds.tolist()
        targets = evaluation.targets.tolist()
        per_class = evaluation.per_class()
        columns = list(per_class[0])
        logged = {
            "eval/confusion_matrix": wandb.plot.confusion_matrix(
                y_true=targets, preds=preds, class_names=classes, title="confusion matrix"
            ),
            "eval/per_class": wandb.Table(
                columns=columns, data=[[row[c] for c in columns] for row in per_class]
            ),
        }
        if log_misclassified > 0:
            probs = evaluation.probs
            table = wandb.Table(columns=["index", "image", "true", "predicted", "score"])
            wrong = [i for i, (p, t) in enumerate(zip(preds, targets, strict=True)) if p != t]
            for i in wrong[:log_misclassified]:
                picture = wandb.Image(to_picture(dataset[i][0]))
                score = float(probs[i, preds[i]])
                table.add_data(i, picture, classes[targets[i]], classes[preds[i]], score)
            logged["eval/misclassified"] = table
        self.wandb_run.log(logged)

    def close(self, failed: bool = False) -> None:
        self._jsonl.close()
        if self.wandb_run:
            self.wandb_run.finish(exit_code=1 if failed else 0)
            self.wandb_run = None

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is SystemExit and self.wandb_run:  # submitit's requeue on preemption/timeout
            self.wandb_run.mark_preempting()
        self.close(failed=exc_type is not None)
        return False


def _truncate_jsonl(path: Path, step: int) -> None:
    """Drop the records a killed run wrote after `step`, so a resumed run does not repeat them."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines(keepends=True):
        if not line.endswith("\n"):
            break  # the half-written last line of a killed process
        record = json.loads(line)
        if "summary" not in record and record["step"] <= step:
            kept.append(line)
    atomic_write_text(path, "".join(kept))
    log.info("metrics.jsonl: kept %d records up to step %d", len(kept), step)


NON_FINITE = "non_finite"  # the key that names a record's NaN and infinite values


def jsonl_line(record: dict) -> str:
    """`record` as one line of strict JSON: a NaN or infinite value is written as null, and the
    record's `non_finite` entry maps its key to "NaN", "Infinity" or "-Infinity" (bare NaN, as
    json.dumps writes it, is not JSON: jq, JavaScript and most JSON readers reject the line)."""
    return json.dumps(_encode(record), allow_nan=False) + "\n"


def read_jsonl_line(line: str) -> dict:
    """A metrics.jsonl record with its non-finite values as floats again; also reads the lines
    of older runs, which hold bare NaN."""
    return _decode(json.loads(line))


def read_metrics(path: Path) -> list[dict]:
    """The complete records of a metrics.jsonl (a killed run's half-written last line left out)."""
    lines = Path(path).read_text().split("\n")[:-1]  # the part after the last newline is partial
    return [read_jsonl_line(line) for line in lines if line.strip()]


def _encode(record: dict) -> dict:
    out, non_finite = {}, {}
    for key, value in record.items():
        if isinstance(value, dict):
            value = _encode(value)
        elif isinstance(value, float) and not math.isfinite(value):
            non_finite[key] = json.dumps(value)  # NaN, Infinity, -Infinity
            value = None
        out[key] = value
    return {**out, NON_FINITE: non_finite} if non_finite else out


def _decode(record: dict) -> dict:
    non_finite = record.pop(NON_FINITE, None) or {}
    for key, value in record.items():
        if isinstance(value, dict):
            record[key] = _decode(value)
    for key, name in non_finite.items():
        record[key] = float(name)  # float() reads NaN, Infinity, -Infinity
    return record


class NullLogger:
    """RunLogger's calls, recording nothing: what ranks other than 0 log with, and tools (the
    benchmark) that keep no metrics files."""

    run_id = None

    def log(self, metrics: dict, step: int) -> None:
        pass

    def summary(self, values: dict) -> None:
        pass

    def log_checkpoint(self, path: Path, name: str, metadata: dict) -> None:
        pass

    def log_evaluation(self, *args, **kwargs) -> None:
        pass

    def close(self, failed: bool = False) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        return False
