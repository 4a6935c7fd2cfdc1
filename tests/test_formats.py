"""Annotation formats built for real in tmp: OpenMMLab 2.0 JSON (single- and multi-label), with
the path-confinement rules of data=annfile and bad entries named by file and entry."""

import json
import os
from pathlib import Path

import pytest
import torch

from data.openmmlab_json import openmmlab_json
from tests.test_bad_data import ESCAPES, SMALL, annotated_root, picture


def write_json(path: Path, entries: list, classes=("ant", "bee", "cat")) -> Path:
    content = {"metainfo": {"classes": list(classes)}, "data_list": entries}
    path.write_text(json.dumps(content))
    return path


def build(root: Path, **kwargs):
    return openmmlab_json(str(root), train_transform=SMALL, eval_transform=SMALL, **kwargs)


def test_single_label_json_reads_as_annfile_does(tmp_path):
    root = annotated_root(tmp_path)
    write_json(root / "train.json", [{"img_path": "images/0.png", "gt_label": 2}])
    write_json(root / "val.json", [{"img_path": "images/1.png", "gt_label": 0}])
    splits = build(root)
    assert splits.classes == ["ant", "bee", "cat"]
    image, label = splits.train[0]
    assert label == 2 and image.shape == (3, 8, 8)
    assert splits.val.targets == [0] and not getattr(splits.train, "multi_label", False)


def test_multi_label_json_gives_multi_hot_targets(tmp_path):
    root = annotated_root(tmp_path)
    picture(root / "images" / "2.jpg", (12, 12), seed=2)
    train = [
        {"img_path": "images/0.png", "gt_label": [0, 2]},
        {"img_path": "images/2.jpg", "gt_label": 1},  # one label of a multi-label file
    ]
    write_json(root / "train.json", train)
    write_json(root / "val.json", [{"img_path": "images/1.png", "gt_label": [2, 2, 1]}])
    splits = build(root)
    assert splits.train.multi_label
    assert splits.train.targets.tolist() == [[1, 0, 1], [0, 1, 0]]  # without decoding images
    image, target = splits.val[0]
    assert target.dtype == torch.float32 and target.tolist() == [0, 1, 1]
    assert image.shape == (3, 8, 8)


@pytest.mark.parametrize("case", list(ESCAPES))
def test_json_rejects_paths_that_leave_the_root(tmp_path, case):
    root = annotated_root(tmp_path)
    listed, error = ESCAPES[case]
    listed = listed.format(tmp=tmp_path)
    entries = [{"img_path": "images/0.png", "gt_label": 0}, {"img_path": listed, "gt_label": 1}]
    write_json(root / "train.json", entries)
    write_json(root / "val.json", entries[:1])
    with pytest.raises(ValueError, match=error) as info:
        build(root)
    message = str(info.value)
    assert f"{root / 'train.json'}, data_list[1]" in message and repr(listed) in message


BAD_ENTRIES = {
    "label out of range": ({"img_path": "images/0.png", "gt_label": 3}, r"unknown label 3.*0\.\.2"),
    "label not an int": ({"img_path": "images/0.png", "gt_label": "bee"}, r"'bee' is not an int"),
    "label list with a string": ({"img_path": "images/0.png", "gt_label": [0, "x"]}, r"'x'"),
    "no img_path": ({"gt_label": 0}, r"expected \{\"img_path\""),
    "not an object": ("images/0.png", r"expected \{\"img_path\""),
}


@pytest.mark.parametrize("case", list(BAD_ENTRIES))
def test_bad_entries_are_named_with_file_and_index(tmp_path, case):
    root = annotated_root(tmp_path)
    entry, error = BAD_ENTRIES[case]
    write_json(root / "train.json", [{"img_path": "images/1.png", "gt_label": 0}, entry])
    write_json(root / "val.json", [{"img_path": "images/1.png", "gt_label": 0}])
    with pytest.raises(ValueError, match=error) as info:
        build(root)
    assert f"{root / 'train.json'}, data_list[1]" in str(info.value)


def test_bad_files_are_named(tmp_path):
    root = annotated_root(tmp_path)
    (root / "train.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"train\.json is not valid JSON"):
        build(root)
    (root / "train.json").write_text(json.dumps([{"img_path": "images/0.png"}]))
    with pytest.raises(ValueError, match=r"expected an object with a `data_list` list"):
        build(root)
    write_json(root / "train.json", [])
    with pytest.raises(ValueError, match=r"data_list is empty"):
        build(root)
    with pytest.raises(FileNotFoundError, match=r"data\.dataset\.root='/no/such"):
        openmmlab_json("/no/such", train_transform=SMALL, eval_transform=SMALL)


def test_class_names_from_the_option_override_the_metainfo(tmp_path):
    root = annotated_root(tmp_path)
    entries = [{"img_path": "images/0.png", "gt_label": 1}]
    write_json(root / "train.json", entries, classes=())
    write_json(root / "val.json", entries)
    assert build(root, classes=["x", "y"]).classes == ["x", "y"]
    assert build(root, classes="classes.txt").classes == ["ant", "bee"]
    assert os.path.isfile(root / "classes.txt")
