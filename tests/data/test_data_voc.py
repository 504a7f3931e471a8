"""`ann data pack voc12aug`: VOC 2012 + SBD (.mat labels read with scipy) into shards, mmseg's trainaug split."""

import io
import json
import tarfile

import cv2
import numpy as np
import pytest
from PIL import Image
from scipy.io import savemat

from anncli.data.voc import VOC_PALETTE
from conftest import ROOT, run_ann

VOC_TRAIN, VOC_VAL = ["2007_000032", "2007_000039"], ["2007_000033"]
SBD_TRAIN, SBD_VAL = ["2008_000002", "2007_000032"], ["2008_000003", "2007_000033"]


def label_for(i: str) -> np.ndarray:
    rng = np.random.default_rng(int(i.replace("_", "")))
    return rng.integers(0, 21, size=(12, 16), dtype=np.uint8)


def make_voc(root):
    voc = root / "VOCdevkit" / "VOC2012"
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (voc / sub).mkdir(parents=True)
    sbd = root / "VOCdevkit" / "VOCaug" / "dataset"
    (sbd / "cls").mkdir(parents=True)
    for i in set(VOC_TRAIN + VOC_VAL + SBD_TRAIN + SBD_VAL):
        cv2.imwrite(str(voc / "JPEGImages" / f"{i}.jpg"), np.full((12, 16, 3), 100, np.uint8))
    for i in VOC_TRAIN + VOC_VAL:  # VOC labels: palette PNGs whose indices are the ids, 255 on borders
        label = label_for(i)
        label[0] = 255
        png = Image.fromarray(label, mode="P")
        png.putpalette([c for rgb in VOC_PALETTE for c in rgb] + [224, 224, 192] * 235)
        png.save(voc / "SegmentationClass" / f"{i}.png")
    for i in SBD_TRAIN + SBD_VAL:  # SBD: MATLAB structs GTcls.Segmentation, no ignore value
        savemat(sbd / "cls" / f"{i}.mat", {"GTcls": {"Segmentation": (label_for(i) + 1) % 21,
                                                     "CategoriesPresent": np.array([1])}})
    (voc / "ImageSets/Segmentation/train.txt").write_text("\n".join(VOC_TRAIN) + "\n")
    (voc / "ImageSets/Segmentation/val.txt").write_text("\n".join(VOC_VAL) + "\n")
    (sbd / "train.txt").write_text("\n".join(SBD_TRAIN) + "\n")
    (sbd / "val.txt").write_text("\n".join(SBD_VAL) + "\n")


def read_labels(out, split) -> dict[str, np.ndarray]:
    manifest = json.loads((out / f"voc12aug-{split}.json").read_text())
    labels = {}
    for shard in manifest["shards"]:
        with tarfile.open(out / shard["name"]) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".seg.png"):
                    data = np.frombuffer(tar.extractfile(member).read(), np.uint8)
                    labels[member.name.split(".")[0]] = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
    assert manifest["num_classes"] == 21 and manifest["classes"][0] == "background"
    return labels


def test_voc12aug_train_is_voc_train_plus_sbd_minus_voc_val(tmp_path):
    make_voc(tmp_path)
    for split in ("train", "val"):
        result = run_ann("data", "pack", "voc12aug", tmp_path, tmp_path / "out", "--split", split)
        assert result.returncode == 0, result.stderr
    train = read_labels(tmp_path / "out", "train")
    assert sorted(train) == ["2007_000032", "2007_000039", "2008_000002", "2008_000003"]
    # VOC's own label wins where there is one (2007_000032 is in both), SBD's .mat elsewhere
    expected_voc = label_for("2007_000032")
    expected_voc[0] = 255
    assert np.array_equal(train["2007_000032"], expected_voc)
    assert np.array_equal(train["2008_000003"], (label_for("2008_000003") + 1) % 21)
    val = read_labels(tmp_path / "out", "val")
    assert sorted(val) == ["2007_000033"] and val["2007_000033"][0, 0] == 255


def test_voc12aug_without_sbd_is_a_one_line_error(tmp_path):
    make_voc(tmp_path)
    import shutil

    shutil.rmtree(tmp_path / "VOCdevkit" / "VOCaug")
    result = run_ann("data", "pack", "voc12aug", tmp_path, tmp_path / "out", "--split", "train")
    assert result.returncode == 2
    assert "SBD annotations" in result.stderr and len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("override, message", [
    ("loss.ohem_min_kept=0", "loss.ohem_min_kept"),
    ("model.variant=mmseg", "variant mmseg"),  # demo.yaml uses the small backbone
    ("model.variant=detectron", "model.variant"),
])
def test_recipe_rejects(override, message):
    result = run_ann("recipe", "validate", "recipes/demo.yaml", "--set", override)
    assert result.returncode == 2 and message in result.stderr


def test_mmseg_model_zoo_recipes_validate():
    names = sorted(p.name for p in (ROOT / "recipes").glob("ann_r*-d8_4xb*.yaml"))
    assert len(names) == 16
    result = run_ann("recipe", "validate", *[f"recipes/{n}" for n in names])
    assert result.returncode == 0, result.stderr
