"""Parameters, multiply-accumulates and FLOPs of a model config, in total and per module.

python analysis/flops.py                                 # the default model at its pretrained size
python analysis/flops.py model=vit_base +depth=3         # per module down to 3 levels
python analysis/flops.py model=resnet50 '+shape=[3,160,160]' +num_classes=10

Counted by torch.utils.flop_counter.FlopCounterMode for one image (batch 1): matrix products,
convolutions and attention (scaled_dot_product_attention); normalisation, activations and
pooling are not counted, as in the published figures (ResNet-50: 4.1 GMACs). One MAC is two
FLOPs. Input shape: `+shape=[C,H,W]`, else timm's pretrained input size for the model
(`model.img_size` respected); classes: `+num_classes` (1000). No dataset is loaded.
"""

import hydra
import torch
from omegaconf import DictConfig
from rich.console import Console
from rich.table import Table
from torch import nn
from torch.utils import flop_counter
from torch.utils.flop_counter import FlopCounterMode

from analysis.cli import no_run_folder

aten = torch.ops.aten


def _sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)


def _sdpa_backward_flops(grad_shape, query_shape, key_shape, value_shape, *args, **kwargs) -> int:
    return flop_counter.sdpa_backward_flop_count(grad_shape, query_shape, key_shape, value_shape)


# torch's counter knows the CUDA attention kernels (flash, efficient, cudnn) but not the ones
# the CPU, MPS and other backends dispatch F.scaled_dot_product_attention to, which it counts
# as 0: ViT-B on the CPU came out 16.85 instead of 17.56 GMACs. The same formula (Q @ K^T and
# scores @ V) counts them, so a model counts the same on every device and on the meta device.
SDPA_OF_OTHER_BACKENDS = {
    aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_flops,
    aten._scaled_dot_product_fused_attention_overrideable: _sdpa_flops,
    aten._scaled_dot_product_attention_math_for_mps: _sdpa_flops,
    aten._scaled_dot_product_flash_attention_for_cpu_backward: _sdpa_backward_flops,
    aten._scaled_dot_product_fused_attention_overrideable_backward: _sdpa_backward_flops,
}


def model_complexity(model: nn.Module, input_shape) -> dict:
    """{params, macs, flops} of one forward pass of `model` on one image of shape (C, H, W).

    Runs on the model's own device (meta tensors work) in eval mode without gradients, and
    leaves the model's training flag as it was: BatchNorm statistics do not move.
    """
    counts = count_modules(model, input_shape, depth=0)[""]
    return {k: counts[k] for k in ("params", "macs", "flops")}


def count_modules(model: nn.Module, input_shape, depth: int = 2) -> dict[str, dict]:
    """Per module name ('' is the whole model, then named_modules() names down to `depth`
    dots-plus-one levels): {type, params, macs, flops}. A parent's counts include its children's.
    """
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None else torch.float32
    was_training = model.training
    model.eval()
    try:
        with (
            torch.no_grad(),
            FlopCounterMode(display=False, custom_mapping=SDPA_OF_OTHER_BACKENDS) as counter,
        ):
            model(torch.zeros(1, *input_shape, device=device, dtype=dtype))
    finally:
        model.train(was_training)
    by_tracker_name = counter.get_flop_counts()  # '<RootClass>.<module name>' -> {op: flops}
    root = type(model).__name__
    rows = {}
    for name, module in model.named_modules():
        if name and name.count(".") >= depth:
            continue
        key = f"{root}.{name}" if name else root
        flops = sum(by_tracker_name.get(key, {}).values())
        rows[name] = {
            "type": type(module).__name__,
            "params": sum(p.numel() for p in module.parameters()),
            "macs": flops // 2,
            "flops": flops,
        }
    return rows


def flops(cfg: DictConfig, shape=None, num_classes: int = 1000, depth: int = 2):
    """Build cfg's model (architecture only, on the meta device: no memory, no init time) and
    count it. Returns (per-module rows as in `count_modules`, the input shape (C, H, W))."""
    from engine.build import build_model_for
    from models.timm_models import preprocessing

    if shape is None:
        shape = preprocessing(cfg.model.name, img_size=cfg.model.get("img_size"))["input_size"]
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3:
        raise ValueError(f"shape={list(shape)} must be [C, H, W], e.g. '+shape=[3,224,224]'")
    kwargs = {"num_classes": num_classes, "in_chans": shape[0], "load_weights": False}
    try:
        with torch.device("meta"):
            model = build_model_for(cfg, **kwargs)
        rows = count_modules(model, shape, depth)
    except (NotImplementedError, RuntimeError):  # an op without a meta kernel: count on the CPU
        model = build_model_for(cfg, **kwargs)
        rows = count_modules(model, shape, depth)
    return rows, shape


def table(rows: dict[str, dict], title: str) -> Table:
    total = rows[""]
    out = Table(title=title)
    for column in ("module", "type", "params (M)", "GMACs", "GFLOPs", "% MACs"):
        out.add_column(column, justify="left" if column in ("module", "type") else "right")
    for name, r in rows.items():
        share = 100 * r["macs"] / total["macs"] if total["macs"] else 0.0
        indent = "  " * (name.count(".") + 1) if name else ""
        out.add_row(
            f"{indent}{name or 'total'}",
            r["type"],
            f"{r['params'] / 1e6:.3f}",
            f"{r['macs'] / 1e9:.3f}",
            f"{r['flops'] / 1e9:.3f}",
            f"{share:.1f}",
            end_section=not name,
        )
    return out


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    rows, shape = flops(
        cfg, cfg.get("shape"), num_classes=cfg.get("num_classes", 1000), depth=cfg.get("depth", 2)
    )
    total = rows[""]
    title = (
        f"{cfg.model.name} on {list(shape)}, {cfg.get('num_classes', 1000)} classes: "
        f"{total['params'] / 1e6:.2f} M params, {total['macs'] / 1e9:.3f} GMACs, "
        f"{total['flops'] / 1e9:.3f} GFLOPs"
    )
    Console(width=max(Console().width, 100)).print(table(rows, title))


if __name__ == "__main__":
    no_run_folder()
    main()
