"""SpeedNet: the small fast CNN of airbench (Keller Jordan) and hlb-CIFAR10, for speed runs.

Three groups of conv -> 2x2 max-pool -> BatchNorm -> GELU -> conv -> BatchNorm -> GELU, a
global max-pool and a linear classifier whose logits are scaled down. It trains CIFAR-10 to
94% in seconds on one GPU (conf/experiment/cifar10_speedrun.yaml). Differences from airbench94:
the stem is a trainable 3x3 conv + BatchNorm (airbench initialises a 2x2 conv as a whitening
of the training images' patches, which needs the data) and the model takes any input size.

It answers the parts of timm's model interface the engine uses (`num_classes`,
`get_classifier()`, `pretrained_cfg`), so local weight files load as for timm models.
"""

from collections.abc import Sequence
from itertools import pairwise

import torch
from torch import nn

from models.timm_models import load_weights

ARCHITECTURE = "speednet"


class ConvGroup(nn.Module):
    def __init__(self, in_chans: int, out_chans: int, bn_momentum: float):
        super().__init__()
        self.conv1 = _conv(in_chans, out_chans)
        self.pool = nn.MaxPool2d(2)
        self.norm1 = _norm(out_chans, bn_momentum)
        self.conv2 = _conv(out_chans, out_chans)
        self.norm2 = _norm(out_chans, bn_momentum)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # pooling before the norm: the norm and activation run on a quarter of the pixels
        x = self.act(self.norm1(self.pool(self.conv1(x))))
        return self.act(self.norm2(self.conv2(x)))


class SpeedNet(nn.Module):
    def __init__(
        self,
        num_classes: int,
        in_chans: int = 3,
        widths: Sequence[int] = (64, 256, 256),
        stem_width: int = 32,
        logit_scale: float = 1 / 9,
        bn_momentum: float = 0.4,
    ):
        super().__init__()
        self.num_classes = num_classes
        self.logit_scale = logit_scale
        self.stem = nn.Sequential(
            nn.Conv2d(in_chans, stem_width, 3, padding=1, bias=False),
            _norm(stem_width, bn_momentum),
            nn.GELU(),
        )
        chans = [stem_width, *widths]
        self.blocks = nn.Sequential(*(ConvGroup(a, b, bn_momentum) for a, b in pairwise(chans)))
        self.pool = nn.AdaptiveMaxPool2d(1)
        self.head = nn.Linear(chans[-1], num_classes, bias=False)
        # what timm's models carry and models.timm_models.load_weights reads
        self.pretrained_cfg = {
            "architecture": ARCHITECTURE,
            "first_conv": "stem.0",
            "classifier": "head",
            "num_classes": num_classes,
        }

    def get_classifier(self) -> nn.Module:
        return self.head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.blocks(self.stem(x))).flatten(1)
        # small logits at init: with a high LR and label smoothing the softmax does not saturate
        return self.head(x) * self.logit_scale


def speednet(
    num_classes: int,
    in_chans: int = 3,
    name: str = ARCHITECTURE,
    widths: Sequence[int] = (64, 256, 256),
    stem_width: int = 32,
    logit_scale: float = 1 / 9,
    bn_momentum: float = 0.4,
    pretrained: bool = False,
    weights: str | None = None,
) -> SpeedNet:
    """SpeedNet with a `num_classes` head and an `in_chans`-channel stem.

    name: 'speednet', the name checkpoints, exports and the server report.
    widths: output channels of the three conv groups (each halves the resolution);
        stem_width: of the stem conv. 2.0 M parameters and 0.15 GMACs at 32 px by default.
    logit_scale: multiplies the logits (airbench: 1/9).
    bn_momentum: PyTorch's BatchNorm momentum; 0.4 (airbench) makes the running statistics
        follow the last few batches, right for runs of a few hundred updates. The BatchNorm
        scales stay at 1 (only the biases train) and the group convs start as partial
        identities (Dirac), as in airbench.
    pretrained: there are no hub weights; weights: a local weights file (a run's checkpoint),
        the classifier skipped when its class count differs.
    """
    if name != ARCHITECTURE:
        raise ValueError(
            f"model.name={name!r}: models.speednet builds {ARCHITECTURE!r} only; "
            "model.widths sets its size"
        )
    if pretrained:
        raise ValueError(
            "model.pretrained=true: speednet has no hub weights; set model.pretrained=false, "
            "or load a run's checkpoint with model.weights=<run>/checkpoints/best.pt"
        )
    if len(widths) < 1 or any(int(w) < 1 for w in widths):
        raise ValueError(f"model.widths={list(widths)} must be one or more positive widths")
    model = SpeedNet(
        num_classes,
        in_chans,
        tuple(int(w) for w in widths),
        stem_width,
        logit_scale,
        bn_momentum,
    )
    if weights:
        load_weights(model, weights)
    return model


def _conv(in_chans: int, out_chans: int) -> nn.Conv2d:
    conv = nn.Conv2d(in_chans, out_chans, 3, padding=1, bias=False)
    with torch.no_grad():
        # the first in_chans filters pass their input channel through: a network that starts
        # near the identity trains faster (airbench: 18 instead of 21 epochs to 94%)
        nn.init.dirac_(conv.weight[: min(in_chans, out_chans)])
    return conv


def _norm(chans: int, momentum: float) -> nn.BatchNorm2d:
    norm = nn.BatchNorm2d(chans, eps=1e-12, momentum=momentum)
    norm.weight.requires_grad_(False)  # scale fixed at 1: only the bias trains (airbench)
    return norm
