"""Any timm architecture by name."""

import difflib

import timm
from torch import nn


def create(
    name: str,
    num_classes: int,
    in_chans: int = 3,
    pretrained: bool = False,
    drop_rate: float = 0.0,
    drop_path_rate: float = 0.0,
) -> nn.Module:
    """Build timm model `name` with a `num_classes` head and an `in_chans`-channel stem.

    `pretrained=True` loads the hub weights timm knows for `name` (needs network or a filled
    Hugging Face cache). timm adapts the stem to `in_chans` and drops a head of another size.
    """
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise ValueError(
            f"model.name={name!r} is not a timm model{hint} "
            "(`python -c \"import timm; print(timm.list_models('*res*'))\"` lists names)"
        )
    kwargs = {"drop_rate": drop_rate}
    if drop_path_rate:
        # only some architectures take it; asking for 0 must work for all of them
        kwargs["drop_path_rate"] = drop_path_rate
    try:
        return timm.create_model(
            name, pretrained=pretrained, num_classes=num_classes, in_chans=in_chans, **kwargs
        )
    except OSError as err:  # hub download failed: offline or no such weights
        raise RuntimeError(
            f"model.pretrained=true but the weights of {name!r} could not be fetched ({err}). "
            "Connect to the network, fill the Hugging Face cache (HF_HOME), "
            "or set model.pretrained=false."
        ) from err
