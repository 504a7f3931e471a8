"""Data off the happy path, on real tar files: member names that would escape a folder (reading, packing,
`eval --save-pred`), a truncated training shard in a real training, `pipe:` sources that keep failing,
and a re-pack over a longer earlier pack."""

import io
import json
import logging
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from anncli.data.global_stream import GlobalStream
from anncli.data.counts import shard_counts
from anncli.data.manifest import resolve_urls
from anncli.data.shards import DataError, ShardWriter, eval_samples, iter_shard
from anncli.data.synth import _encode_png, make_sample, write_synth
from anncli.errors import UserError
from anncli.eval import evaluate
from anncli.eval.evaluate import EvalOptions, run_evaluation
from conftest import run_ann, tiny_overrides
from test_data_pack import make_cityscapes
from test_data_stream import _stream as stream_of  # the same augmentation and seed as the stream tests
from test_data_stream import _take
from test_eval_run import write_checkpoint, write_recipe, write_split

ANN = str(Path(sys.executable).with_name("ann"))


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def _raw_shard(path: Path, keys: list[str]) -> str:
    """A tar written member by member with tarfile, names as given (what a crafted or foreign shard holds)."""
    rng = np.random.default_rng(0)
    with tarfile.open(path, "w") as tar:
        for key in keys:
            image, label, _ = make_sample(rng, 32, 64)
            for field, data in (("img.png", _encode_png(image)), ("seg.png", _encode_png(label))):
                info = tarfile.TarInfo(f"{key}.{field}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return str(path)


def _stream(urls, counts, **kw):
    return stream_of(urls, counts, **{"batch_size": 2, "effective_batch": 2, "lanes": 2, **kw})


# ---------------------------------------------------------------- member names that escape a folder


@pytest.mark.parametrize("bad", ["../../x", "/tmp/ann-abs/x", "a\\..\\x", "ok/../../x"])
def test_reading_refuses_members_that_escape_a_folder(tmp_path, bad):
    url = _raw_shard(tmp_path / "crafted-val-000000.tar", ["s0", bad, "s2"])
    read = []
    with pytest.raises(tarfile.ReadError, match="unsafe member name"):
        read.extend(key for key, _ in iter_shard(url))
    assert read == ["s0"]  # the whole sample before it, nothing from it on
    with pytest.raises(UserError) as err:  # evaluation: one line naming the shard and the member
        list(eval_samples([url], rank=0, world_size=1))
    line = str(err.value)
    assert url in line and repr(f"{bad}.img.png") in line and "\n" not in line


def test_inspect_reports_an_escaping_member_as_a_problem(tmp_path):
    url = _raw_shard(tmp_path / "crafted-val-000000.tar", ["s0", "s1", "../../x", "s3"])
    res = run_ann("data", "inspect", url, "--json")
    assert res.returncode == 1, res.stderr
    report = json.loads(res.stdout)
    assert report["samples"] == 2 and not report["ok"]
    (problem,) = report["problems"]
    assert problem.startswith(f"{url}: shard unreadable after 2 samples: unsafe member name '../../x.img.png'")


def test_training_counts_an_escaping_member_as_a_fault(tmp_path, caplog):
    urls = [_raw_shard(tmp_path / "good-train-000000.tar", [f"g{i}" for i in range(8)]),
            _raw_shard(tmp_path / "crafted-train-000000.tar", ["c0", "c1", "../../x", "c3"])]
    stream = _stream(urls, [8, 4], max_skip_fraction=0.9)
    with caplog.at_level(logging.WARNING, logger="anncli.data"):
        keys = [k for b in _take(stream, 12) for k in b["keys"]]
    # the samples before the crafted member are whole and read; none after it
    assert {"c0", "c1"} <= set(keys) and not any(".." in k for k in keys) and "c3" not in keys
    assert stream.samples_skipped >= 2
    cut = [r.getMessage() for r in caplog.records if "crafted-train-000000.tar is cut" in r.getMessage()]
    assert cut and all("unsafe member name '../../x.img.png'" in c for c in cut)
    assert len(cut) == len({re.search(r"in cycle (\d+)", c).group(1) for c in cut})  # once per cycle


@pytest.mark.parametrize("key, fields", [("..", {"img.png": b"x"}), ("a\\b", {"img.png": b"x"}),
                                         ("", {"img.png": b"x"}), ("k", {"img/../../x": b"x"})])
def test_the_writer_refuses_keys_that_escape_a_folder(tmp_path, key, fields):
    writer = ShardWriter(tmp_path, "w-train", max_count=10, max_size=1 << 30)
    with pytest.raises(UserError):
        writer.write(key, fields)
    writer.close()
    assert not any(tmp_path.rglob("x"))


def test_save_pred_refuses_paths_outside_its_folder(tmp_path):
    pred = tmp_path / "out" / "pred"
    pred.mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    (pred / "link").symlink_to(tmp_path / "elsewhere")
    assert evaluate._inside(pred, "a/b.png") == (pred / "a" / "b.png").resolve()
    for name in ["../../x.png", "/tmp/x.png", "link/x.png"]:
        with pytest.raises(UserError, match="outside"):
            evaluate._inside(pred, name)


def test_eval_save_pred_with_a_crafted_shard_writes_nothing_outside(tmp_path):
    data = tmp_path / "data"
    write_split(data, "val", [2])
    shard = data / "synth-val-000000.tar"  # the same split with an escaping member in the middle
    escape = tmp_path / "escape"
    members = []
    with tarfile.open(shard) as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(shard, "w") as tar:
        for name, blob in members[:2] + [(f"{escape}.img.png", members[0][1]), (f"{escape}.seg.png", members[1][1]),
                                         ("../../escape.img.png", members[0][1])] + members[2:]:
            info = tarfile.TarInfo(name)
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    recipe = write_recipe(tmp_path / "recipe.yaml", data)
    checkpoint = write_checkpoint(tmp_path / "run", recipe)
    from anncli.recipe import load_recipe

    opts = EvalOptions.from_cli(load_recipe(recipe), str(recipe), checkpoint, False, None, None, None, None, None,
                                None, "val", None, tmp_path / "out" / "pred")
    with pytest.raises(UserError, match="unsafe member name"):
        run_evaluation(load_recipe(recipe), opts)
    assert not list(tmp_path.rglob("escape*")) and not list(tmp_path.parent.glob("escape*"))


# ---------------------------------------------------------------- a truncated training shard, trained on


def test_training_on_a_truncated_shard_warns_once_a_cycle_and_counts_the_skips(tmp_path):
    root = tmp_path / "data"
    write_synth(root, train=64, val=12, size=(32, 64), seed=0, max_samples=64, verbose=False)
    shard = root / "synth-train-000000.tar"
    with tarfile.open(shard) as tar:
        heads = [m.offset for m in tar.getmembers() if m.name.endswith(".img.png")]
    shard.write_bytes(shard.read_bytes()[: heads[34] + 100])  # 34 of 64 samples readable, the 35th header cut
    run = tmp_path / "run"
    res = run_ann("train", "recipes/demo.yaml", "--work-dir", str(run),
                  *tiny_overrides(root, **{"data.synth.train": 64, "data.synth.max_samples": 64, "train.iters": 40,
                                           "train.checkpoint_every": 40, "train.log_every": 10,
                                           "data.max_skip_fraction": 0.9}))
    assert res.returncode == 0, res.stderr[-3000:]
    cut = [line for line in res.stderr.splitlines() if "synth-train-000000.tar is cut after 34 samples" in line]
    assert len(cut) == 2 and "in cycle 0" in cut[0] and "in cycle 1" in cut[1], res.stderr[-3000:]  # once a cycle
    steps = [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()]
    skipped = [e["samples_skipped"] for e in steps if e["event"] == "step"]
    assert skipped == sorted(skipped) and skipped[-1] >= 30  # every sample behind the cut, and its substitutes


def test_a_one_sample_bad_shard_is_warned_about_once_and_the_error_counts_it(tmp_path, caplog):
    """Every substitute of a one-sample set is that sample again: one warning, then the bound, with a count."""
    image, _, _ = make_sample(np.random.default_rng(0), 32, 64)
    url = str(tmp_path / "x-train-000000.tar")
    with tarfile.open(url, "w") as tar:
        for field, data in (("img.png", _encode_png(image)), ("seg.png", b"not a png")):
            info = tarfile.TarInfo(f"s0.{field}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    stream = stream_of([url], [1], batch_size=1, effective_batch=1, lanes=1)
    with caplog.at_level(logging.WARNING, logger="anncli.data"), pytest.raises(DataError) as err:
        _take(stream, 1)
    warned = [r.getMessage() for r in caplog.records if "skipping bad training sample" in r.getMessage()]
    assert len(warned) == 1 and "x-train-000000.tar: sample s0: label is not a readable image" in warned[0], warned
    assert re.search(r"skipped 100 of 100 training samples .*; last problem \(100 times\): .*sample s0",
                     str(err.value)), err.value


# ---------------------------------------------------------------- pipe: sources that keep failing


# The words reach the message only from the command's stderr, never from the command line itself.
CREDENTIALS = "pipe:sh -c 'printf \"Unable to locate %s\\n\" credentials >&2; exit 1'"


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("source", ["pipe:false", CREDENTIALS])
def test_a_failing_pipe_source_aborts_in_one_line_with_its_stderr(source, workers, caplog, capfd):
    urls = [f"{source} # shard {i}" for i in range(20)]
    with caplog.at_level(logging.WARNING, logger="anncli.data"):
        with pytest.raises(DataError) as err:
            _take(_stream(urls, [10] * 20, num_workers=workers), 50)
    line = str(err.value)
    assert "\n" not in line and "in a row could not be read" in line and "status 1" in line
    if source == CREDENTIALS:
        assert "Unable to locate credentials" in line
    assert len(caplog.records) <= 10  # a few warnings, not hundreds
    err = capfd.readouterr().err  # the command's own stderr is captured for the message, not printed per try
    assert not any(line.strip() == "Unable to locate credentials" for line in err.splitlines())


def test_a_failing_pipe_in_evaluation_or_counting_is_one_line_with_its_stderr(tmp_path):
    with pytest.raises(UserError, match="Unable to locate credentials") as err:
        list(eval_samples([CREDENTIALS], rank=0, world_size=1))
    assert "\n" not in str(err.value)
    with pytest.raises(UserError, match="without a manifest: .*Unable to locate credentials"):
        shard_counts([CREDENTIALS], tmp_path, announce=False)  # a shard no manifest lists is counted first


# ---------------------------------------------------------------- re-packing over a longer pack


def test_repacking_fewer_samples_removes_the_stale_shards(tmp_path):
    out = tmp_path / "out"
    for n in (5, 3):
        make_cityscapes(tmp_path / f"cs{n}", n=n)
        res = subprocess.run([ANN, "data", "pack", "cityscapes", str(tmp_path / f"cs{n}"), str(out), "--split", "train",
                              "--max-samples", "1"], capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, res.stderr
    assert "removed 2 stale shard(s)" in res.stderr and "cityscapes-train-000004.tar" in res.stderr
    assert sorted(p.name for p in out.glob("*.tar")) == [f"cityscapes-train-{i:06d}.tar" for i in range(3)]
    assert len(list(eval_samples(resolve_urls(str(out), "cityscapes", "train"), rank=0, world_size=1))) == 3
    with pytest.raises(UserError, match="2 of 5 shard files"):  # the earlier pack's range no longer reads
        resolve_urls(str(out), "cityscapes", str(out / "cityscapes-train-{000000..000004}.tar"))
    res = subprocess.run([ANN, "data", "inspect", str(out / "cityscapes-train-*.tar"), "--json"],
                         capture_output=True, text=True, timeout=120)
    assert json.loads(res.stdout)["samples"] == 3, res.stderr
