"""Pooled features of a timm classifier: the vector its classifier reads, for embeddings,
retrieval and downstream models (the model cards offer their models as backbones).

timm splits every model's forward into `forward_features` (the backbone: a feature map or
tokens) and `forward_head(x, pre_logits=True)` (pooling, the head's norm or MLP, no classifier):
`num_features` values per image (ResNet-18: 512, ViT-B/16: 768).
"""

import copy

import torch
from torch import nn


def check_feature_api(model: nn.Module) -> None:
    """A clear error for a model without timm's forward_features / forward_head."""
    missing = [m for m in ("forward_features", "forward_head") if not hasattr(model, m)]
    if missing:
        raise ValueError(
            f"{type(model).__name__} has no {' or '.join(missing)}: pooled features need a timm "
            "model (model.name=<timm architecture>), which splits its forward into backbone and head"
        )


def pooled_features(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """(N, num_features): `model`'s pooled, pre-classifier features of preprocessed images."""
    check_feature_api(model)
    return model.forward_head(model.forward_features(images), pre_logits=True)


def feature_extractor(model: nn.Module) -> nn.Module:
    """A copy of `model` whose forward gives its pooled features (`pooled_features`): timm's
    classifier reset to none, so its state dict holds no classifier weights and
    `timm.create_model(name, num_classes=0)` loads it."""
    check_feature_api(model)
    extractor = copy.deepcopy(model)
    extractor.reset_classifier(0)
    return extractor
