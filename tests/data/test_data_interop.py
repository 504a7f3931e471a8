"""Our shards are plain WebDataset shards: the webdataset library reads them sample for sample."""

import io
import json

import numpy as np
import webdataset as wds
from PIL import Image

from anncli.data.manifest import resolve_urls
from anncli.data.shards import eval_samples
from anncli.data.synth import write_synth


def _label(data: bytes) -> np.ndarray:
    return np.array(Image.open(io.BytesIO(data)))  # no .convert: the ids must survive


def test_webdataset_reads_synth_shards(tmp_path):
    write_synth(tmp_path, train=0, val=10, size="32x64", seed=3, max_samples=4, verbose=False)
    urls = resolve_urls(str(tmp_path), "synth", "val")
    assert len(urls) == 3
    ours = {s["key"]: s for s in eval_samples(urls, rank=0, world_size=1)}
    ds = wds.WebDataset(urls, shardshuffle=False, empty_check=False)
    theirs = list(ds)
    assert sorted(s["__key__"] for s in theirs) == sorted(ours)
    for sample in theirs:
        mine = ours[sample["__key__"]]
        assert np.array_equal(_label(sample["seg.png"]), mine["label"])
        assert np.array_equal(np.array(Image.open(io.BytesIO(sample["img.png"])).convert("RGB")), mine["image"])
        assert json.loads(sample["meta.json"])  # the per-sample metadata is JSON
