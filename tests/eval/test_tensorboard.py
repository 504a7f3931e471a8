"""`train.tensorboard: true` for real: the event file, read back with TensorBoard's own reader."""

import json

import pytest

from conftest import run_ann, tiny_overrides


def test_tensorboard_scalars_match_the_jsonl_events(tmp_path, synth_root):
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    run = tmp_path / "run"
    sets = tiny_overrides(synth_root, **{"train.tensorboard": "true", "train.val_every": 3})
    res = run_ann("train", "recipes/demo.yaml", "--work-dir", run, *sets)
    assert res.returncode == 0, res.stderr[-3000:]
    files = list((run / "tb").glob("events.out.tfevents.*"))
    assert len(files) == 1, files

    acc = event_accumulator.EventAccumulator(str(run / "tb"), size_guidance={event_accumulator.SCALARS: 0})
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    expected = {f"train/{k}" for k in ("loss", "aux_loss", "total_loss", "lr", "img_per_s", "mem_mb")}
    assert expected | {"val/mIoU", "val/aAcc"} <= tags, tags

    events = [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()]
    steps = {e["step"]: e for e in events if e["event"] == "step"}
    vals = {e["step"]: e for e in events if e["event"] == "val"}
    assert sorted(steps) == [1, 2, 3, 4, 5, 6] and sorted(vals) == [3, 6]
    for key in ("loss", "aux_loss", "lr"):
        scalars = acc.Scalars(f"train/{key}")
        assert [s.step for s in scalars] == sorted(steps)
        for s in scalars:  # TensorBoard stores float32
            assert s.value == pytest.approx(steps[s.step][key], rel=1e-6, abs=1e-9), (key, s.step)
    miou = acc.Scalars("val/mIoU")
    assert [s.step for s in miou] == [3, 6]
    assert [s.value for s in miou] == pytest.approx([vals[3]["mIoU"], vals[6]["mIoU"]], rel=1e-6)
