"""W&B (offline files) and MLflow (a real `mlflow server` on 127.0.0.1 with SQLite) get a run's recipe,
series and pictures, continue the same tracker run after a resume without logging a step twice, and an
unreachable tracker costs one warning line, never the training run."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import run_ann, tiny_overrides
from wandb_files import config, history, run_id

STEPS = 9  # the second launch resumes from step 3 and trains on to step 9


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """`mlflow server` with a SQLite store and proxied artifacts, on a free port of 127.0.0.1."""
    pytest.importorskip("mlflow")
    pytest.importorskip("flask")
    root, port = tmp_path_factory.mktemp("mlflow"), free_port()
    log = root / "server.log"
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{root}/mlflow.db",
           "--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
           "--workers", "1"]
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240
        while not _healthy(uri):
            assert proc.poll() is None, f"mlflow server ended: {log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"mlflow server not up: {log.read_text()[-3000:]}"
            time.sleep(0.5)
        yield uri
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def _healthy(uri: str) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(f"{uri}/health", timeout=2) as answer:
            return answer.status == 200
    except OSError:
        return False


def _train(synth_root: Path, run: Path, *extra: str, iters: int = 6):
    sets = tiny_overrides(synth_root, **{"train.iters": iters, "train.val_every": 3})
    return run_ann("train", "recipes/demo.yaml", "--work-dir", run, *sets, *extra)


def _events(run: Path, event: str, key: str) -> dict[int, float]:
    """{step: value} of events.jsonl, the record written first for a step logged twice: the trackers keep
    the values of the launch that logged a step first (here the second launch's schedule to step 9 gives
    steps 4-6 other learning rates than the first launch's to step 6)."""
    out = {}
    for line in (run / "events.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record["event"] == event:
            out.setdefault(record["step"], record[key])
    return out


def _train_twice(synth_root: Path, run: Path, *sets: str) -> tuple:
    """Six steps, then a resume from the older checkpoint at step 3 on to step 9: steps 4-6 run twice."""
    first = _train(synth_root, run, *sets)
    assert first.returncode == 0, first.stderr[-3000:]
    second = _train(synth_root, run, *sets, "--resume", run / "checkpoints" / "step-000003", iters=STEPS)
    assert second.returncode == 0, second.stderr[-3000:]
    return first, second


@pytest.mark.slow  # the server starts in about 40 s and the two launches take about 80 s on 2 busy cores
def test_wandb_and_mlflow_get_one_run_with_every_step_once_across_a_resume(tmp_path, synth_root, mlflow_server):
    pytest.importorskip("wandb")
    import mlflow

    run = tmp_path / "run"
    _train_twice(synth_root, run, "--set", "logging.wandb.project=ann-test", "--set", "logging.wandb.mode=offline",
                 "--set", f"logging.mlflow.tracking_uri={mlflow_server}", "--set", "logging.mlflow.experiment=ann-test")
    _check_wandb(run)
    _check_mlflow(run, mlflow.MlflowClient(tracking_uri=mlflow_server), tmp_path)


def _check_wandb(run: Path) -> None:
    files = sorted(run.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(files) == 2, files  # one per launch, both of the same W&B run
    assert run_id(files[0]) == run_id(files[1]) == json.loads((run / "trackers.json").read_text())["wandb"]["id"]
    first, second = history(files[0]), history(files[1])
    logged = [s for s, row in first.items() if "train/loss" in row] + [s for s, row in second.items() if "train/loss" in row]
    assert sorted(logged) == list(range(1, STEPS + 1))  # 4-6 once: the resumed launch skips them
    losses = _events(run, "step", "loss")
    for step, row in {**first, **second}.items():
        if "train/loss" in row:
            assert row["train/loss"] == losses[step]
    val = {s: row for s, row in {**first, **second}.items() if "val/mIoU" in row}
    assert sorted(val) == [3, 6, 9]
    assert val[9]["val/mIoU"] == _events(run, "val", "mIoU")[9]
    assert {"val/mAcc", "val/aAcc"} <= set(val[9]) and any(k.startswith("val/IoU/") for k in val[9])
    assert config(files[0])["train.iters"] == 6 and config(files[0])["model.name"] == "ann"
    saved = {p.relative_to(p.parents[1] if p.parent.name == "val" else p.parent).as_posix()
             for f in files for p in (f.parent / "files").rglob("*") if p.is_file()}
    assert {"val/step-000003.json", "val/step-000009.json", "curves.png", "classes.png"} <= saved, saved


def _check_mlflow(run: Path, client, tmp_path: Path) -> None:
    experiment = client.get_experiment_by_name("ann-test")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1 and runs[0].info.run_id == json.loads((run / "trackers.json").read_text())["mlflow"]["run_id"]
    run_id_ = runs[0].info.run_id
    assert runs[0].info.status == "FINISHED" and runs[0].info.run_name == "demo"
    assert runs[0].data.params["train.iters"] == "6" and runs[0].data.params["logging.mlflow.experiment"] == "ann-test"
    loss = client.get_metric_history(run_id_, "train/loss")
    assert sorted(m.step for m in loss) == list(range(1, STEPS + 1))
    assert {m.step: m.value for m in loss} == _events(run, "step", "loss")
    lr = client.get_metric_history(run_id_, "train/lr")
    assert {m.step: m.value for m in lr} == _events(run, "step", "lr")
    miou = client.get_metric_history(run_id_, "val/mIoU")
    assert {m.step: m.value for m in miou} == _events(run, "val", "mIoU")
    assert [m.step for m in client.get_metric_history(run_id_, "val/mAcc")] == [3, 6, 9]
    names = {a.path for a in client.list_artifacts(run_id_)} | {a.path for a in client.list_artifacts(run_id_, "val")}
    assert {"val/step-000003.json", "val/step-000006.json", "val/step-000009.json", "curves.png", "classes.png"} <= names
    local = client.download_artifacts(run_id_, "val/step-000009.json", str(tmp_path))
    assert json.loads(Path(local).read_text())["mIoU"] == _events(run, "val", "mIoU")[9]


def test_an_unreachable_mlflow_server_costs_one_warning_not_the_run(tmp_path, synth_root):
    pytest.importorskip("mlflow")
    run = tmp_path / "run"
    done = _train(synth_root, run, "--set", f"logging.mlflow.tracking_uri=http://127.0.0.1:{free_port()}")
    assert done.returncode == 0, done.stderr[-3000:]
    warnings = [l for l in done.stderr.splitlines() if l.startswith("[ann] warning: mlflow:")]
    assert len(warnings) == 1, done.stderr[-3000:]
    assert "not logging to mlflow" in warnings[0] and "Traceback" not in done.stderr
    assert (run / "checkpoints" / "step-000006" / "COMPLETE").exists()


def test_a_tracker_recipe_key_with_a_bad_value_is_one_line(tmp_path):
    done = run_ann("train", "recipes/demo.yaml", "--work-dir", tmp_path / "run", "--set", "logging.wandb.project=p",
                   "--set", "logging.wandb.mode=online-ish", "--dry-run")
    assert done.returncode == 2
    assert "logging.wandb.mode" in done.stderr and "Traceback" not in done.stderr
