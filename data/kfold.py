"""k-fold cross-validation on the training split of any dataset."""

import logging

import numpy as np

from data.splits import LabelledSubset, Splits, labels_of

log = logging.getLogger(__name__)


def kfold(splits: Splits, fold: int, num_folds: int = 5, fold_seed: int = 0) -> Splits:
    """Train on all folds of `splits.train` but `fold`; validate on `fold`.

    The folds are stratified by class and fixed by `fold_seed`: for one seed, folds
    0..num_folds-1 are disjoint and together hold every training image once. The validation
    fold is read with the evaluation transform (`splits.train_eval`). The dataset's own
    validation / test split is not used.
    """
    if num_folds < 2:
        raise ValueError(f"data.num_folds={num_folds} must be at least 2")
    if not 0 <= fold < num_folds:
        raise ValueError(f"data.fold={fold} must be in 0..{num_folds - 1} (data.num_folds - 1)")
    train_idx, val_idx = fold_indices(labels_of(splits.train), fold, num_folds, fold_seed)
    source_of_val = splits.train_eval if splits.train_eval is not None else splits.train
    return Splits(
        train=LabelledSubset(splits.train, train_idx.tolist()),
        val=LabelledSubset(source_of_val, val_idx.tolist()),
        classes=splits.classes,
        in_chans=splits.in_chans,
        train_eval=LabelledSubset(source_of_val, train_idx.tolist()),
        preprocess=splits.preprocess,
    )


def fold_indices(
    labels: list[int], fold: int, num_folds: int, fold_seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, val indices) of fold `fold` of `num_folds`, stratified by `labels`."""
    counts = np.bincount(labels)[np.unique(labels)]
    if counts.max() < num_folds:
        raise ValueError(
            f"data.num_folds={num_folds} but no class has that many training images "
            f"(at most {counts.max()}); lower data.num_folds"
        )
    smallest = counts.min()
    if smallest < num_folds:
        log.warning(
            "data.num_folds=%d but a class has only %d training images: some validation folds "
            "lack it",
            num_folds,
            smallest,
        )
    from sklearn.model_selection import StratifiedKFold  # here: ~2 s of start-up otherwise

    folds = StratifiedKFold(n_splits=num_folds, shuffle=True, random_state=fold_seed)
    return list(folds.split(np.zeros(len(labels)), labels))[fold]
