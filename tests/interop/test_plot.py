"""`ann plot`: curves of real runs overlaid, per-class bars of real `ann eval --json` files, clear errors."""

import json
import subprocess
import sys

import pytest
from PIL import Image

from anncli.errors import UserError
from anncli.interop.plot import read_events, run_plot
from conftest import ROOT, ann_env, run_ann, tiny_overrides


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """The tiny demo and demo-fcn: 6 steps each, validation at steps 3 and 6, and their eval JSON."""
    base = tmp_path_factory.mktemp("plot")
    runs = {}
    for recipe, name in (("recipes/demo.yaml", "ann"), ("recipes/demo-fcn.yaml", "fcn")):
        sets = tiny_overrides(base / "synth", **{"train.val_every": 3})
        res = run_ann("train", recipe, "--work-dir", base / name, *sets)
        assert res.returncode == 0, res.stderr[-3000:]
        res = run_ann("eval", recipe, "--work-dir", base / name, *sets, "--json", base / name / "metrics.json")
        assert res.returncode == 0, res.stderr[-3000:]
        runs[name] = base / name
    return runs


def test_curves_overlay_every_logged_step_and_validation_of_each_run(two_runs, tmp_path):
    out = tmp_path / "curves.png"
    res = run_ann("plot", two_runs["ann"], two_runs["fcn"], "--out", out)
    assert res.returncode == 0, res.stderr
    assert Image.open(out).size[0] > 1000
    drawn = run_plot([two_runs["ann"], two_runs["fcn"]], tmp_path / "again.png")
    for curve in ("loss", "aux_loss", "lr", "img_per_s"):
        assert drawn[curve] == {"ann": 6, "fcn": 6}, curve
    assert drawn["mIoU"] == {"ann": 2, "fcn": 2}
    series = read_events(two_runs["ann"])
    events = [json.loads(line) for line in (two_runs["ann"] / "events.jsonl").read_text().splitlines()]
    val = [e for e in events if e["event"] == "val"]
    assert series["mIoU"] == {e["step"]: e["mIoU"] * 100 for e in val}
    assert sorted(series["lr"]) == [1, 2, 3, 4, 5, 6]


def test_class_bars_of_eval_json_files(two_runs, tmp_path):
    files = [two_runs["ann"] / "metrics.json", two_runs["fcn"] / "metrics.json"]
    res = run_ann("plot", *files, "--out", tmp_path / "classes.png")
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "classes.png").stat().st_size > 0
    drawn = run_plot(files, tmp_path / "again.png")
    assert list(drawn) == [f"demo (mIoU {json.loads(files[0].read_text())['mIoU'] * 100:.2f})",
                           f"demo-fcn (mIoU {json.loads(files[1].read_text())['mIoU'] * 100:.2f})"]
    for label, f in zip(drawn, files):
        rows = json.loads(f.read_text())["per_class"]
        assert len(drawn[label]) == len(rows) == 5
        for got, row in zip(drawn[label], rows):
            assert got == pytest.approx(row["IoU"] * 100) or (row["IoU"] is None and got != got)


def test_a_resumed_run_keeps_the_last_record_of_a_step(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    lines = [{"event": "start", "step": 0}, {"event": "step", "step": 10, "loss": 1.0, "lr": 0.1},
             {"event": "step", "step": 20, "loss": 0.9, "lr": 0.1}, {"event": "resume", "step": 10},
             {"event": "step", "step": 20, "loss": 0.5, "lr": 0.1}, {"event": "val", "step": 20, "mIoU": 0.25}]
    (run / "events.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    series = read_events(run)
    assert series["loss"] == {10: 1.0, 20: 0.5}
    assert series["mIoU"] == {20: 25.0}
    assert series["img_per_s"] == {}


def test_bad_inputs_are_one_line_with_exit_2(two_runs, tmp_path):
    cases = [
        ([tmp_path / "missing"], "no such file"),
        ([tmp_path], "no events.jsonl"),
        ([two_runs["ann"], two_runs["fcn"] / "metrics.json"], "not both"),
    ]
    for inputs, message in cases:
        res = run_ann("plot", *inputs, "--out", tmp_path / "x.png")
        assert res.returncode == 2 and message in res.stderr, res.stderr
        assert "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) == 1
    (tmp_path / "other.json").write_text("{}")
    with pytest.raises(UserError, match="not a metrics file"):
        run_plot([tmp_path / "other.json"], tmp_path / "x.png")
    with pytest.raises(UserError, match="--out"):
        run_plot([two_runs["ann"]], tmp_path / "x.txt")


def test_an_empty_events_file_is_one_line_not_an_empty_chart(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "events.jsonl").write_bytes(b"")
    res = run_ann("plot", run, "--out", tmp_path / "x.png")
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert res.stderr.strip() == f"ann: error: {run / 'events.jsonl'}: is empty; nothing to plot"
    (run / "events.jsonl").write_text('{"event": "start", "step": 0}\n')
    with pytest.raises(UserError, match="holds no logged step or validation yet; nothing to plot"):
        run_plot([run], tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_without_matplotlib_the_error_names_the_extra(two_runs, tmp_path):
    code = ("import sys; sys.modules['matplotlib'] = None; from anncli.cli.main import main; "
            f"sys.argv = ['ann', 'plot', {str(two_runs['ann'])!r}, '--out', {str(tmp_path / 'x.png')!r}]; main()")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=ann_env())
    assert res.returncode == 2, res.stderr
    assert res.stderr.strip() == "ann: error: pictures need matplotlib: pip install 'anncli[plot]'"
