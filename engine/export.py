"""A trained model in files that other programs load: ONNX, and safetensors with a JSON sidecar.

    from engine.export import export
    from engine.predict import load_trained
    export(load_trained("outputs/<date>/<time>"), "export/")  # model.onnx, .safetensors, .json

model.onnx      input "input" (N, C, H, W) float32, preprocessed as the sidecar's "preprocess"
                says; output "logits" (N, classes). N is dynamic. Checked at export time: ONNX
                Runtime and PyTorch must agree within `atol` at two batch sizes, or no file is
                written. The class names and preprocessing are in its metadata too.
model.safetensors + model.json
                the weights, and what engine.predict.load_trained needs to rebuild the model
                (config, class names, preprocessing). model.weights=<file> loads the weights alone.

Exporter: torch.onnx.export(dynamo=True), the torch.export-based one (the default since
torch 2.9; the TorchScript one is deprecated). With timm's fused attention switched off for the
export (see _explicit_attention) it exports every conf/model option, CNNs (ResNet, ConvNeXt,
EfficientNet, MobileNetV3) and attention models (ViT, DeiT, Swin, BEiT v2), with a dynamic batch
dimension; ONNX Runtime then agrees with PyTorch within 3e-6 on the logits.
Every file appears under its final name only complete (and, for ONNX, checked).
"""

import contextlib
import copy
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from engine import files
from engine.files import atomic_write_text
from engine.predict import SIDECAR_FORMAT, Trained
from models.features import feature_extractor

log = logging.getLogger(__name__)

FORMATS = ("onnx", "safetensors")
INPUT_NAME, OUTPUT_NAME = "input", "logits"
# task.output: what the exported model gives. features: a feature extractor, the pooled
# pre-classifier features (models.features), in features.onnx (output "features") and
# features.safetensors + features.json (no classifier weights: timm's num_classes=0 loads it)
OUTPUTS = ("logits", "features")
MIN_OPSET = 18  # the oldest opset the torch.export-based exporter writes (older: it converts)
CHECK_BATCH = 4  # random check inputs when no images are given
CHECK_SEED = 0
# protobuf caps a file at 2 GiB; a larger model's ONNX graph keeps its weights in model.onnx.data
ONE_FILE_MAX_BYTES = 1800 * 2**20
# trained.info entries copied into the sidecar when present: where the weights came from
# temperature: task=calibrate's; softmax(logits / temperature) gives the calibrated scores
PROVENANCE = ("epoch", "step", "best", "metrics", "wandb_run_id", "temperature")
# and always: whether the scores are sigmoids (a multi-label model) or a softmax


def export(
    trained: Trained,
    out: str | Path,
    formats: Iterable[str] = FORMATS,
    opset: int = 18,
    atol: float = 1e-4,
    check_inputs: torch.Tensor | None = None,
    output: str = "logits",
) -> list[Path]:
    """Write `trained` into folder `out` in each of `formats`; return the paths written.

    onnx: <out>/model.onnx, checked with ONNX Runtime against PyTorch on `check_inputs`
        (preprocessed images (N, C, H, W); None: random normal inputs) at batch sizes N and 1.
        A largest |ONNX - PyTorch| over `atol` raises a RuntimeError and leaves no new file.
    safetensors: <out>/model.safetensors and its sidecar <out>/model.json.
    The model runs on the CPU in float32; `trained.model` itself is left as it was.
    output: "logits", or "features" for a feature extractor (see OUTPUTS), written as
    features.onnx / features.safetensors / features.json.
    """
    formats = _check_formats(formats)
    if output not in OUTPUTS:  # before any file is read or written
        raise ValueError(f"task.output={output!r}: choose one of {list(OUTPUTS)}")
    _check_opset(opset)
    _check_atol(atol)
    input_size = tuple(int(v) for v in trained.preprocess["input_size"])
    _check_input_shape(check_inputs, input_size)

    out = Path(out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    model = copy.deepcopy(trained.model).to("cpu", torch.float32).eval()
    model, stem, meta = _for_output(model, trained, output)
    written = []
    for fmt in formats:
        if fmt == "safetensors":
            written += export_safetensors(model, out / f"{stem}.safetensors", meta)
            continue
        if check_inputs is None:
            generator = torch.Generator().manual_seed(CHECK_SEED)
            check_inputs = torch.randn(CHECK_BATCH, *input_size, generator=generator)
            log.info(
                "export: no check images given; ONNX is checked on %d random normal inputs "
                "of %s (pass check_inputs, preprocessed images, to check on real ones)",
                CHECK_BATCH,
                input_size,
            )
        path = out / f"{stem}.onnx"
        metadata = _onnx_metadata(trained) | ({"output": output} if stem != "model" else {})
        diff = export_onnx(model, path, check_inputs, opset, atol, metadata, output)
        log.info(
            "export: wrote %s; max |ONNX - PyTorch| = %.3g on %d check inputs (atol %g)",
            path,
            diff,
            len(check_inputs),
            atol,
        )
        # a model too large for one file keeps its weights beside the graph
        data = path.with_name(f"{path.name}.data")
        written += [data, path] if data.exists() else [path]
    return written


def export_onnx(
    model: nn.Module,
    path: str | Path,
    check_inputs: torch.Tensor,
    opset: int = 18,
    atol: float = 1e-4,
    metadata: dict[str, str] | None = None,
    output_name: str = OUTPUT_NAME,
) -> float:
    """`model` (CPU, float32, eval mode) as ONNX file `path` with a dynamic batch dimension.

    Checked before it takes its final name: ONNX Runtime (CPU) and `model` run `check_inputs`
    (N, C, H, W) and its first image alone; returns the largest absolute difference of the
    logits, and raises a RuntimeError if that exceeds `atol`. `metadata`: string entries for the
    file's metadata_props (ONNX Runtime: session.get_modelmeta().custom_metadata_map).
    `output_name`: the graph's output ("logits"; a feature extractor's: "features").
    """
    _check_opset(opset)
    _check_atol(atol)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    check_inputs = check_inputs.detach().to("cpu", torch.float32)
    # torch.export fixes a dimension whose example size is 0 or 1: trace with a batch of 2
    example = check_inputs[:2] if len(check_inputs) > 1 else check_inputs.expand(2, -1, -1, -1)
    batches = [check_inputs, check_inputs[:1]] if len(check_inputs) > 1 else [example, example[:1]]
    size = sum(t.numel() * t.element_size() for t in model.state_dict().values())

    # built in a folder of its own beside `path`, under the final names (the graph refers to
    # its external data file by name), and moved into place once checked
    staging = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        staged = staging / path.name
        program = _torch_export(model, example, opset, output_name)
        written_opset = program.model.opset_imports.get("")
        if written_opset != opset:  # the exporter converts versions, and on failure goes on
            raise ValueError(
                f"task.opset={opset}: the ONNX exporter could not write opset {opset} "
                f"(its graph has opset {written_opset}); use task.opset={written_opset}"
            )
        program.model.metadata_props.update(metadata or {})
        program.save(staged, external_data=size > ONE_FILE_MAX_BYTES)

        diff = _max_difference(staged, model, batches, output_name)
        if not diff <= atol:  # a NaN difference fails too
            raise RuntimeError(
                f"ONNX Runtime and PyTorch disagree: max |ONNX - PyTorch| = {diff:.3g} on batches "
                f"of {[len(b) for b in batches]} > atol={atol:g}; {path.name} not written. "
                "A model whose inference is random (dropout or noise left on) or that branches "
                "on tensor values does not export faithfully; raise task.atol only if a float32 "
                "rounding difference is expected"
            )
        # weights beside the graph (large models) first, the graph last
        for file in sorted(staging.iterdir(), key=lambda p: p.name == path.name):
            with files.replacing(path.parent / file.name, create=False) as tmp:
                os.replace(file, tmp)
        if size <= ONE_FILE_MAX_BYTES:  # a larger model's weights from an earlier export
            path.with_name(f"{path.name}.data").unlink(missing_ok=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return diff


def _torch_export(model: nn.Module, example: torch.Tensor, opset: int, output_name: str):
    """The ONNXProgram of `model` traced on `example`, with a dynamic batch dimension."""
    try:
        with _quiet("onnxscript", "onnx_ir"), _explicit_attention(model):
            return torch.onnx.export(
                model,
                (example.contiguous(),),
                dynamo=True,
                opset_version=opset,
                input_names=[INPUT_NAME],
                output_names=[output_name],
                dynamic_shapes=({0: torch.export.Dim("batch")},),
                verbose=False,
            )
    except Exception as err:
        # torch's message is a page of advice; its summary line names the failing operation
        summary = str(err).rpartition("## Exception summary")[2].strip().partition("\n")[0]
        raise RuntimeError(
            f"torch.onnx.export could not export {type(model).__name__} at opset {opset} "
            f"({type(err).__name__}: {summary}). Export the weights alone with "
            "task.formats=[safetensors], or try another task.opset"
        ) from err


@contextlib.contextmanager
def _explicit_attention(model: nn.Module):
    """timm's attention as matmul and softmax instead of F.scaled_dot_product_attention.

    torch's decomposition of scaled_dot_product_attention with a mask builds a view that fails
    for BEiT's relative position bias (pytorch/pytorch#136543); opset 18 has no attention op
    either way, so the graph is the same arithmetic. `fused_attn` is timm's switch, read at
    each forward call; the check runs the model as it was (fused), so it covers the change.
    """
    modules = [m for m in model.modules() if getattr(m, "fused_attn", False) is True]
    for module in modules:
        module.fused_attn = False
    try:
        yield
    finally:
        for module in modules:
            module.fused_attn = True


@contextlib.contextmanager
def _quiet(*loggers: str):
    """The exporter's libraries log each graph pass at INFO: keep their warnings only."""
    levels = {name: logging.getLogger(name).level for name in loggers}
    for name in loggers:
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        yield
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


def _max_difference(
    onnx_file: Path, model: nn.Module, batches: list[torch.Tensor], output_name: str = OUTPUT_NAME
) -> float:
    """Largest |ONNX Runtime - PyTorch| of the output (logits or features) over `batches`."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    diff = 0.0
    for batch in batches:
        with torch.inference_mode():
            expected = model(batch).float().numpy()
        try:
            (got,) = session.run([output_name], {INPUT_NAME: batch.numpy()})
        except Exception as err:
            raise RuntimeError(
                f"ONNX Runtime could not run the exported model on a batch of {tuple(batch.shape)} "
                f"({type(err).__name__}: {err})"
            ) from err
        if got.shape != expected.shape:
            raise RuntimeError(
                f"the exported model gives {output_name} of shape {got.shape} for a batch of "
                f"{tuple(batch.shape)}; PyTorch gives {expected.shape}"
            )
        diff = max(diff, float(np.abs(got - expected).max()))  # NaN stays NaN
    return diff


def export_safetensors(model: nn.Module, path: str | Path, meta: dict) -> list[Path]:
    """`model`'s state dict as safetensors file `path`, and `meta` as its .json sidecar."""
    from safetensors.torch import save_file

    path = Path(path)
    state, storages = {}, set()
    for key, tensor in model.state_dict().items():
        tensor = tensor.detach().cpu().contiguous()
        # safetensors refuses tensors that share memory (tied or viewed weights): copy those
        storage = tensor.untyped_storage().data_ptr()
        if tensor.numel() and storage in storages:
            tensor = tensor.clone()
        storages.add(storage)
        state[key] = tensor
    with files.replacing(path) as tmp:
        save_file(state, tmp, metadata={"format": "pt"})
    sidecar_path = path.with_suffix(".json")  # where engine.predict.load_trained looks
    atomic_write_text(sidecar_path, json.dumps(meta, indent=2) + "\n")
    return [path, sidecar_path]


def sidecar(trained: Trained) -> dict:
    """The .json beside exported weights: what engine.predict.load_trained rebuilds them with."""
    meta = {
        "format": SIDECAR_FORMAT,
        "model_name": trained.model_name,
        "class_names": list(trained.classes),
        "in_chans": int(trained.preprocess["input_size"][0]),
        "preprocess": _plain(trained.preprocess),
        "config": trained.config,
        "weights": trained.info.get("weights", "model"),  # trained or EMA weights
        "source": str(trained.source),
        "multi_label": bool(trained.info.get("multi_label", False)),
    }
    meta.update({k: trained.info[k] for k in PROVENANCE if trained.info.get(k) is not None})
    return meta


def _for_output(model: nn.Module, trained: Trained, output: str) -> tuple[nn.Module, str, dict]:
    """(the model to export, its file stem, its sidecar). A feature extractor's sidecar says
    what the output is and how wide (no classifier: timm.create_model(name, num_classes=0))."""
    if output == "logits":
        return model, "model", sidecar(trained)
    meta = sidecar(trained) | {"output": "features", "num_classes": 0}
    meta["num_features"] = int(getattr(model, "num_features", 0)) or None
    return feature_extractor(model), "features", meta


def _onnx_metadata(trained: Trained) -> dict[str, str]:
    """What a program using model.onnx alone needs besides the graph, as string entries."""
    return {
        "model_name": trained.model_name,
        "class_names": json.dumps(list(trained.classes)),
        "preprocess": json.dumps(_plain(trained.preprocess)),
        "weights": str(trained.info.get("weights", "model")),
        "source": str(trained.source),
        "multi_label": json.dumps(bool(trained.info.get("multi_label", False))),
        "temperature": str(trained.info.get("temperature") or 1.0),
    }


def _plain(preprocess: dict) -> dict:
    return {k: list(v) if isinstance(v, tuple | list) else v for k, v in preprocess.items()}


def _check_formats(formats: Iterable[str]) -> list[str]:
    formats = [formats] if isinstance(formats, str) else list(formats)
    for fmt in formats:
        if fmt not in FORMATS:
            raise ValueError(
                f"task.formats: {fmt!r} is not an export format; use one or more of {list(FORMATS)}"
            )
    if not formats:
        raise ValueError(f"task.formats is empty: nothing to export; use {list(FORMATS)}")
    return list(dict.fromkeys(formats))


def _check_input_shape(check_inputs: torch.Tensor | None, input_size: tuple) -> None:
    if check_inputs is not None and (
        check_inputs.ndim != 4 or tuple(check_inputs.shape[1:]) != input_size
    ):
        raise ValueError(
            f"check_inputs of shape {tuple(check_inputs.shape)}: expected preprocessed images "
            f"(N, *{input_size}), the model's input as its preprocess input_size says"
        )


def _check_opset(opset: int) -> None:
    if isinstance(opset, bool) or not isinstance(opset, int) or opset < MIN_OPSET:
        raise ValueError(
            f"task.opset={opset!r}: the torch.export-based ONNX exporter writes opset "
            f"{MIN_OPSET} or newer; use an integer >= {MIN_OPSET}"
        )


def _check_atol(atol: float) -> None:
    if isinstance(atol, bool) or not isinstance(atol, int | float) or not atol >= 0:
        raise ValueError(
            f"task.atol={atol!r}: the largest |ONNX - PyTorch| difference accepted must be a "
            "number >= 0 (1e-4 suits float32 logits)"
        )
