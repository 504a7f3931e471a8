"""Messages about data name what the user gave and what to do: a folder given as shards says what it holds,
an empty split names its shards, sizes read height x width like every option, and a split named as
`ann data pack` took it (`training`) finds the manifest pack wrote (`train`)."""

import io
import tarfile

import numpy as np
import pytest

from anncli.data import datasets
from anncli.data.manifest import resolve_urls
from anncli.data.shards import eval_samples
from anncli.data.synth import _encode_png, write_synth
from anncli.errors import UserError
from test_data_pack import make_ade, make_cityscapes
from test_eval_choose import _cli
from test_eval_run import write_checkpoint, write_recipe, write_split


def test_a_folder_given_as_shards_says_what_it_holds_and_how_to_name_them(tmp_path, monkeypatch):
    write_synth(tmp_path / "s", train=3, val=2, size="32x64", max_samples=2, verbose=False)
    monkeypatch.chdir(tmp_path / "s")
    res = _cli("data", "inspect", ".")
    assert res.exit_code == 2, res.output
    assert ("'.' is a directory (2 manifest(s): synth-train.json, synth-val.json; 3 shard(s)); name a manifest "
            "such as ./synth-val.json, a shard, or a pattern such as './*.tar'") in res.output
    (tmp_path / "empty").mkdir()
    res = _cli("data", "inspect", tmp_path / "empty")
    assert res.exit_code == 2 and "is a directory (no *.tar shards and no manifests)" in res.output, res.output


def test_an_empty_split_names_its_own_shards_not_the_data_root(tmp_path):
    write_split(tmp_path / "data", "val", [1])
    write_split(tmp_path / "elsewhere", "val", [0, 0])  # two empty shards in another folder
    recipe = write_recipe(tmp_path / "recipe.yaml", tmp_path / "data")
    checkpoint = write_checkpoint(tmp_path / "run", recipe)
    pattern = str(tmp_path / "elsewhere" / "synth-val-{000000..000001}.tar")
    res = _cli("eval", recipe, "--checkpoint", checkpoint, "--split", pattern)
    assert res.exit_code == 2, res.output[-2000:]
    assert f"no samples in {tmp_path / 'elsewhere' / 'synth-val-000000.tar'} and 1 more" in res.output
    assert f"no samples under {tmp_path / 'data'}" not in res.output


def _mismatched_shard(path) -> str:
    image = np.zeros((24, 40, 3), np.uint8)  # 24 high, 40 wide
    with tarfile.open(path, "w") as tar:
        for field, data in (("img.png", _encode_png(image)), ("seg.png", _encode_png(np.zeros((24, 36), np.uint8)))):
            info = tarfile.TarInfo(f"s0.{field}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return str(path)


def test_sizes_in_messages_read_height_by_width(tmp_path):
    url = _mismatched_shard(tmp_path / "x-val-000000.tar")
    with pytest.raises(UserError, match=r"image 24x40 and label 24x36 \(HxW\) differ"):
        list(eval_samples([url], rank=0, world_size=1))
    res = _cli("data", "inspect", url)
    assert res.exit_code == 1 and "image 24x40 but label 24x36 (HxW)" in res.output, res.output
    make_cityscapes(tmp_path / "cs", n=1)  # 8 high, 16 wide
    label = next((tmp_path / "cs" / "gtFine").rglob("*_labelIds.png"))
    from PIL import Image

    Image.fromarray(np.zeros((8, 12), np.uint8)).save(label)
    with pytest.raises(UserError, match=r"label is 8x12 but its image is 8x16 \(HxW\)"):
        datasets.pack_dataset("cityscapes", tmp_path / "cs", tmp_path / "out", split="train")


def test_a_split_named_as_pack_took_it_finds_the_manifest_pack_wrote(tmp_path):
    make_ade(tmp_path / "ade", n=2)
    datasets.pack_dataset("ade20k", tmp_path / "ade", tmp_path / "out", split="validation")
    assert (tmp_path / "out" / "ade20k-val.json").is_file()
    assert resolve_urls(str(tmp_path / "out"), "ade20k", "validation") == resolve_urls(str(tmp_path / "out"),
                                                                                       "ade20k", "val")
    with pytest.raises(UserError, match=rf"ade20k-training.json: shard manifest not found \(split 'training' of "
                                        rf"ade20k; {tmp_path / 'out'} holds ade20k-val.json;"):
        resolve_urls(str(tmp_path / "out"), "ade20k", "training")
