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
    assert expected | {"val/mIoU", "val/aAcc", "val/mAcc"} <= tags, tags

    events = [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()]
    steps = {e["step"]: e for e in events if e["event"] == "step"}
    vals = {e["step"]: e for e in events if e["event"] == "val"}
    assert sorted(steps) == [1, 2, 3, 4, 5, 6] and sorted(vals) == [3, 6]
    for key in ("loss", "aux_loss", "lr"):
        scalars = acc.Scalars(f"train/{key}")
        assert [s.step for s in scalars] == sorted(steps)
        for s in scalars:  # TensorBoard stores float32
            assert s.value == pytest.approx(steps[s.step][key], rel=1e-6, abs=1e-9), (key, s.step)
    for key in ("mIoU", "aAcc", "mAcc"):
        series = acc.Scalars(f"val/{key}")
        assert [s.step for s in series] == [3, 6]
        assert [s.value for s in series] == pytest.approx([vals[3][key], vals[6][key]], rel=1e-6)

    # Per-class IoU under the dataset's class names; a class without an IoU (NaN) has no point at that step.
    from anncli.data.datasets import class_names

    names = class_names("synth")
    assert list(vals[3]["IoU"]) == names
    assert {t for t in tags if t.startswith("val/IoU/")} == {f"val/IoU/{n}" for n in names
                                                            if any(vals[s]["IoU"][n] is not None for s in (3, 6))}
    assert vals[6]["IoU"]["background"] is not None
    for name in names:
        expected = {step: vals[step]["IoU"][name] for step in (3, 6) if vals[step]["IoU"][name] is not None}
        if expected:
            series = acc.Scalars(f"val/IoU/{name}")
            assert {s.step: s.value for s in series} == pytest.approx(expected, rel=1e-6)


def test_val_scalars_are_the_flat_series_every_logger_gets():
    from anncli.eval.report import val_scalars

    metrics = {"mIoU": 0.5, "aAcc": 0.75, "mAcc": 0.625, "per_class": [
        {"name": "traffic light", "IoU": 0.25}, {"name": "wall/fence", "IoU": 0.75}, {"name": "sky", "IoU": float("nan")},
    ]}
    assert val_scalars(metrics) == {"val/mIoU": 0.5, "val/aAcc": 0.75, "val/mAcc": 0.625,
                                    "val/IoU/traffic light": 0.25, "val/IoU/wall_fence": 0.75}
