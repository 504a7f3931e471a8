"""`ann train` end to end on the synthetic shards, with real processes and real gloo ranks."""

import json
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from anncli.errors import EXIT_PREEMPTED
from conftest import ROOT, ann_cmd, ann_env, run_ann, start_until_checkpoint, tiny_overrides


def _events(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]


def _final_weights(run_dir: Path, step: int) -> dict:
    path = run_dir / "checkpoints" / f"step-{step:06d}"
    assert (path / "COMPLETE").is_file(), sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    return torch.load(path / "model.pt", weights_only=True)


def _assert_bitwise_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs"


def test_single_process_loss_falls_checkpoints_and_resume(tmp_path, synth_root):
    run = tmp_path / "run"
    args = ["train", "recipes/demo.yaml", "--work-dir", run, *tiny_overrides(synth_root, **{"train.iters": 30,
            "train.checkpoint_every": 10, "train.keep_last": 2, "train.val_every": 30})]
    res = run_ann(*args)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "creat" in (res.stdout + res.stderr).lower()  # the synthetic set was made on first use, and said so
    steps = [e for e in _events(run) if e["event"] == "step"]
    assert len(steps) == 30
    first, last = sum(e["loss"] for e in steps[:5]) / 5, sum(e["loss"] for e in steps[-5:]) / 5
    assert last < first * 0.8, (first, last)
    assert [p.name for p in sorted((run / "checkpoints").iterdir())] == ["step-000020", "step-000030"]
    assert any(e["event"] == "val" and 0 <= e["mIoU"] <= 1 for e in _events(run))
    assert (run / "recipe.yaml").is_file()

    # --resume auto continues to a longer schedule from step 30
    res = run_ann(*args[:-2], *tiny_overrides(synth_root, **{"train.iters": 33}))
    assert res.returncode == 0, res.stderr[-3000:]
    resumed = [e for e in _events(run) if e["event"] == "resume"]
    assert resumed and resumed[-1]["step"] == 30
    assert (run / "checkpoints" / "step-000033" / "COMPLETE").is_file()


def test_resume_refuses_a_different_model(tmp_path, synth_root):
    run = tmp_path / "run"
    assert run_ann("train", "recipes/demo.yaml", "--work-dir", run, *tiny_overrides(synth_root)).returncode == 0
    res = run_ann("train", "recipes/demo.yaml", "--work-dir", run,
                  *tiny_overrides(synth_root, **{"model.key_channels": 16, "train.iters": 9}))
    assert res.returncode == 2
    assert "model.key_channels=32 (recipe: 16)" in res.stderr and "Traceback" not in res.stderr


def _train_until_killed(cmd: list[str], run: Path, after_step: int, sig: int) -> int:
    """Start training, wait until the checkpoint of `after_step` is complete, then send `sig`."""
    proc = start_until_checkpoint(cmd, run, after_step, run.parent / f"{run.name}.log", timeout=300)
    time.sleep(random.uniform(0.0, 0.3))  # somewhere in the steps after the checkpoint
    os.killpg(proc.pid, sig)
    proc.wait(timeout=120)
    _wait_for_no_process_using(run)
    return proc.returncode


def _wait_for_no_process_using(run: Path, timeout: float = 120) -> None:
    """Workers of a killed `ann` must not live on as orphans training into the same run directory."""
    deadline = time.time() + timeout
    while True:
        alive = []
        for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
            try:
                if str(run) in cmdline.read_bytes().decode(errors="replace"):
                    alive.append(cmdline.parent.name)
            except OSError:
                pass
        if not alive:
            return
        assert time.time() < deadline, f"processes still using {run}: {alive}"
        time.sleep(0.2)


@pytest.mark.parametrize("nproc,workers,val_every", [(1, 0, 0), (1, 2, 0), (2, 0, 0), (2, 2, 0), (1, 2, 4), (2, 2, 4)])
def test_sigkill_then_restart_is_bitwise_identical(tmp_path, synth_root, nproc, workers, val_every):
    """val_every on the checkpoint steps: validation, with its own data workers, must not draw from the
    RNG state the checkpoint captured (a resumed run does not repeat that validation)."""
    overrides = tiny_overrides(synth_root, **{"train.iters": 12, "train.checkpoint_every": 4,
                                              "data.num_workers": workers, "train.val_every": val_every})
    base = ["train", "recipes/demo.yaml", "--nproc-per-node", nproc, *overrides]
    ref = run_ann(*base, "--work-dir", tmp_path / "ref")
    assert ref.returncode == 0, ref.stderr[-3000:]

    run = tmp_path / "killed"
    cmd = ann_cmd(*base, "--work-dir", run)
    _train_until_killed(cmd, run, after_step=random.choice([4, 8]), sig=signal.SIGKILL)
    res = subprocess.run(cmd, cwd=ROOT, env=ann_env(), capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert any(e["event"] == "resume" for e in _events(run))
    _assert_bitwise_equal(_final_weights(tmp_path / "ref", 12), _final_weights(run, 12))


def test_sigterm_saves_at_current_step_and_resume_matches(tmp_path, synth_root):
    overrides = tiny_overrides(synth_root, **{"train.iters": 40, "train.checkpoint_every": 100})
    base = ["train", "recipes/demo.yaml", *overrides]
    ref = run_ann(*base, "--work-dir", tmp_path / "ref")
    assert ref.returncode == 0, ref.stderr[-3000:]

    run = tmp_path / "term"
    cmd = ann_cmd(*base, "--work-dir", run)
    log = tmp_path / "term.log"
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ann_env(), stdout=subprocess.DEVNULL, stderr=open(log, "w"))
    deadline = time.time() + 300
    while not (run / "events.jsonl").exists() or not any(e["event"] == "step" for e in _events(run)):
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == EXIT_PREEMPTED, log.read_text()[-2000:]
    preempted = [e for e in _events(run) if e["event"] == "preempted"]
    assert len(preempted) == 1
    step = preempted[0]["step"]
    assert 0 < step < 40
    assert (run / "checkpoints" / f"step-{step:06d}" / "COMPLETE").is_file()

    res = subprocess.run(cmd, cwd=ROOT, env=ann_env(), capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    _assert_bitwise_equal(_final_weights(tmp_path / "ref", 40), _final_weights(run, 40))


@pytest.mark.parametrize("stage", [1, 2])
def test_deepspeed_zero_trains_checkpoints_and_resumes(tmp_path, synth_root, stage):
    run = tmp_path / "ds"
    common = ["train", "recipes/demo.yaml", "--nproc-per-node", 2, "--work-dir", run, "--set", "engine=deepspeed",
              "--set", f"deepspeed.zero_stage={stage}"]
    res = run_ann(*common, *tiny_overrides(synth_root, **{"train.iters": 4, "train.checkpoint_every": 2}))
    assert res.returncode == 0, res.stderr[-4000:]
    ckpt = run / "checkpoints" / "step-000004"
    assert (ckpt / "COMPLETE").is_file() and (ckpt / "zero.pt").is_file() and (ckpt / "model.pt").is_file()
    assert not (ckpt / "deepspeed").exists()  # no DeepSpeed checkpoint, nothing unpickled at resume
    marked = json.loads((ckpt / "COMPLETE").read_text())["files"]  # the checksums cover every file written
    assert sorted(marked) == sorted(p.relative_to(ckpt).as_posix() for p in ckpt.rglob("*") if p.name != "COMPLETE")
    assert {"zero.pt", "model.pt", "data.json", "state.json", "recipe.yaml"} <= set(marked)
    res = run_ann(*common, *tiny_overrides(synth_root, **{"train.iters": 6, "train.checkpoint_every": 2}))
    assert res.returncode == 0, res.stderr[-4000:]
    assert [e["step"] for e in _events(run) if e["event"] == "resume"] == [4]
    assert (run / "checkpoints" / "step-000006" / "COMPLETE").is_file()


def test_bad_resume_path_is_one_line(tmp_path, synth_root):
    res = run_ann("train", "recipes/demo.yaml", "--resume", tmp_path / "nope", *tiny_overrides(synth_root))
    assert res.returncode == 2 and "no such directory" in res.stderr and "Traceback" not in res.stderr


def test_dry_run_prints_the_plan_and_scales_the_lr_when_asked(tmp_path):
    res = run_ann("train", "recipes/cityscapes.yaml", "--nproc-per-node", 2, "--dry-run",
                  "--set", "train.lr_scaling=linear", "--work-dir", tmp_path / "never")
    assert res.returncode == 0, res.stderr
    out = res.stdout
    assert "world size:      2 (1 node(s) x 2 process(es))" in out
    assert "effective batch: 2 (recipe: 8)" in out
    assert "0.0025 (linear scaling 0.01 x 2/8" in out and "iterations:      60000" in out
    assert "anncli.cluster.torchrun" in out and not (tmp_path / "never").exists()
    same = run_ann("train", "recipes/cityscapes.yaml", "--nproc-per-node", 8, "--dry-run")
    assert "0.01 (the recipe's; effective batch matches)" in same.stdout


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_trains_and_checkpoints_the_scaler(tmp_path, synth_root, precision):
    run = tmp_path / "amp"
    res = run_ann("train", "recipes/demo.yaml", "--work-dir", run, "--set", f"train.precision={precision}",
                  *tiny_overrides(synth_root, **{"train.iters": 3, "train.checkpoint_every": 3}))
    assert res.returncode == 0, res.stderr[-3000:]
    steps = [e for e in _events(run) if e["event"] == "step"]
    assert len(steps) == 3 and all(e["loss"] == e["loss"] for e in steps)
    optim = torch.load(run / "checkpoints" / "step-000003" / "optim.pt", weights_only=True)
    assert (optim["scaler"] is not None) == (precision == "fp16")
    assert ("scale" in steps[-1]) == (precision == "fp16")


def test_non_finite_losses_in_a_row_stop_with_the_last_good_checkpoint(tmp_path, synth_root):
    run = tmp_path / "nan"
    res = run_ann("train", "recipes/demo.yaml", "--work-dir", run, "--set", "optim.lr=1e30",
                  "--set", "train.max_bad_steps=2",
                  *tiny_overrides(synth_root, **{"train.iters": 20, "train.checkpoint_every": 1}))
    assert res.returncode == 2, res.stderr[-3000:]
    last = res.stderr.strip().splitlines()[-1]
    assert "2 skipped steps in a row" in last and "non-finite loss" in last and "Last good checkpoint:" in last
    bad = [e for e in _events(run) if e["event"] == "bad_step"]
    assert len(bad) == 2
    good = [p for p in (run / "checkpoints").iterdir() if (p / "COMPLETE").exists()]
    assert good and str(max(good)) in last


def test_the_optimizer_is_built_with_the_first_lr_of_the_schedule():
    from anncli.cluster.distributed import DistInfo
    from anncli.train.engine import DDPEngine
    from anncli.train.plan import lr_at
    from anncli.recipe import Recipe

    recipe = Recipe(name="t", optim={"lr": 0.01, "warmup_iters": 10}, train={"iters": 100})
    info = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    engine = DDPEngine(torch.nn.Linear(2, 2), recipe, info)
    assert engine.optimizer.param_groups[0]["lr"] == lr_at(0, 0.01, recipe) == pytest.approx(0.001)


def test_resume_never_refuses_a_used_run_directory_and_fresh_moves_it_aside(tmp_path, synth_root):
    run = tmp_path / "run"
    base = ["train", "recipes/demo.yaml", "--work-dir", run, *tiny_overrides(synth_root)]
    assert run_ann(*base).returncode == 0
    before = (run / "checkpoints" / "step-000006" / "model.pt").read_bytes()
    res = run_ann(*base, "--resume", "never")
    assert res.returncode == 2 and "Traceback" not in res.stderr
    last = res.stderr.strip().splitlines()[-1]
    assert f"newest {run / 'checkpoints' / 'step-000006'}" in last and "--work-dir" in last and "--fresh" in last
    res = run_ann(*base, "--set", "train.seed=5", "--fresh")  # a new run: any recipe change is fine
    assert res.returncode == 0, res.stderr[-3000:]
    [aside] = run.glob("superseded-*")
    assert (aside / "checkpoints" / "step-000006" / "model.pt").read_bytes() == before
    assert [e["event"] for e in _events(aside)].count("start") == 1
    assert [e["event"] for e in _events(run)].count("start") == 1 and not any(e["event"] == "resume" for e in _events(run))


def test_resume_from_an_older_checkpoint_then_auto_does_not_jump_back(tmp_path, synth_root):
    run = tmp_path / "run"
    base = ["train", "recipes/demo.yaml", "--work-dir", run]
    assert run_ann(*base, *tiny_overrides(synth_root, **{"train.keep_last": 3})).returncode == 0
    older = run / "checkpoints" / "step-000003"
    res = run_ann(*base, "--resume", older, *tiny_overrides(synth_root, **{"train.iters": 4, "train.keep_last": 3}))
    assert res.returncode == 0, res.stderr[-3000:]
    assert [p.name for p in sorted((run / "checkpoints").iterdir())] == ["step-000003", "step-000004"]
    res = run_ann(*base, *tiny_overrides(synth_root, **{"train.iters": 5, "train.keep_last": 3}))
    assert res.returncode == 0, res.stderr[-3000:]
    assert [e["step"] for e in _events(run) if e["event"] == "resume"] == [3, 4]
    [aside] = run.glob("superseded-*")
    assert (aside / "checkpoints" / "step-000006" / "COMPLETE").is_file()


def test_damaged_checkpoint_explicit_fails_auto_falls_back(tmp_path, synth_root):
    run = tmp_path / "run"
    base = ["train", "recipes/demo.yaml", "--work-dir", run]
    assert run_ann(*base, *tiny_overrides(synth_root)).returncode == 0
    newest = run / "checkpoints" / "step-000006"
    (newest / "model.pt").write_bytes((newest / "model.pt").read_bytes()[:1000])  # truncated
    res = run_ann(*base, "--resume", newest, *tiny_overrides(synth_root, **{"train.iters": 9}))
    assert res.returncode == 2 and "Traceback" not in res.stderr and "weights_only" not in res.stderr
    assert res.stderr.strip().splitlines()[-1] == f"ann: error: checkpoint {newest} is damaged: model.pt has 1000 " \
        f"bytes, {json.loads((newest / 'COMPLETE').read_text())['files']['model.pt']['bytes']} were written"
    res = run_ann(*base, *tiny_overrides(synth_root, **{"train.iters": 9}))
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"warning: checkpoint {newest} is damaged: model.pt" in res.stderr
    assert [e["step"] for e in _events(run) if e["event"] == "resume"] == [3]


def test_resume_with_a_changed_recipe_prints_it_and_refuses_what_breaks_exactness(tmp_path, synth_root):
    run = tmp_path / "run"
    base = ["train", "recipes/demo.yaml", "--work-dir", run]
    assert run_ann(*base, *tiny_overrides(synth_root)).returncode == 0
    res = run_ann(*base, *tiny_overrides(synth_root, **{"train.iters": 7, "optim.lr": 0.5, "train.batch_size": 4}))
    assert res.returncode == 2 and "Traceback" not in res.stderr
    last = res.stderr.strip().splitlines()[-1]
    assert "optim.lr: 0.002 -> 0.5" in last and "--allow-recipe-change" in last
    assert "train.batch_size: 2 -> 4" not in last  # harmless: the resume keeps the checkpoint's effective batch
    res = run_ann(*base, *tiny_overrides(synth_root, **{"train.iters": 7, "optim.lr": 0.004}), "--allow-recipe-change")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "train.iters: 6 -> 7" in res.stderr and "optim.lr: 0.002 -> 0.004 (allowed by --allow-recipe-change)" in res.stderr


def test_resume_with_another_split_or_worker_count_needs_no_permission_and_stays_bitwise(tmp_path, synth_root):
    """train.batch_size/accum_steps keeping the effective batch and data.num_workers are RESUME_SAFE_KEYS: the
    global order gives the same samples whatever the worker count (bitwise), and a new split of the same
    effective batch is accepted without --allow-recipe-change."""
    base = ["train", "recipes/demo.yaml", *tiny_overrides(synth_root, **{"train.iters": 12})]
    ref = run_ann(*base, "--work-dir", tmp_path / "ref")
    assert ref.returncode == 0, ref.stderr[-3000:]
    run = tmp_path / "run"
    _train_until_killed(ann_cmd(*base, "--work-dir", run), run, after_step=3, sig=signal.SIGKILL)
    res = run_ann(*base, "--work-dir", run, "--set", "data.num_workers=2")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "data.num_workers: 0 -> 2" in res.stderr and any(e["event"] == "resume" for e in _events(run))
    _assert_bitwise_equal(_final_weights(tmp_path / "ref", 12), _final_weights(run, 12))
    res = run_ann(*base, "--work-dir", run, "--set", "train.iters=13", "--set", "train.batch_size=1",
                  "--set", "train.accum_steps=2")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "train.batch_size: 2 -> 1" in res.stderr and "--allow-recipe-change" not in res.stderr
    resumed = [e for e in _events(run) if e["event"] == "resume"][-1]
    assert (resumed["step"], resumed["batch_size"], resumed["accum_steps"], resumed["effective_batch"]) == (12, 1, 2, 2)
