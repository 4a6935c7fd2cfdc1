from dataclasses import dataclass

from torch.utils.data import Dataset


@dataclass
class Splits:
    """What every dataset builder returns: the two splits and what the model needs to know."""

    train: Dataset
    val: Dataset
    classes: list[str]  # index -> name; travels into checkpoints, logs and predictions
    in_chans: int
