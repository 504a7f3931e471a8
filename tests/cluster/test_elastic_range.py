"""Elastic node ranges (torchrun `--nnodes MIN:MAX`, a PyTorchJob's PET_NNODES): one effective batch at every
size of the range, checked by the plan before anything starts, and kept by the workers of a new run whatever
number of pods joined first. Real `ann train` processes; one real torchrun agent with one worker."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from anncli.cluster.command import LaunchRequest
from anncli.cluster.launch import plan_launch
from anncli.errors import UserError
from anncli.recipe import load_recipe
from anncli.train.plan import describe_plan, plan_split, run_split
from conftest import ROOT, ann_cmd, ann_env, run_ann, tiny_overrides
from test_multinode import free_port

DEMO = "recipes/demo.yaml"


def pod(nnodes: str, endpoint: str = "127.0.0.1:29400", **extra: str) -> dict[str, str]:
    """What the Kubeflow operator sets in a pod of an elastic PyTorchJob, one process per pod."""
    return {"KUBERNETES_SERVICE_HOST": "10.96.0.1", "HOSTNAME": "ann-worker-0", "PET_RDZV_ENDPOINT": endpoint,
            "PET_RDZV_BACKEND": "c10d", "PET_NNODES": nnodes, "PET_NPROC_PER_NODE": "1", "PET_MAX_RESTARTS": "0",
            "ANN_RDZV_TIMEOUT": "60", **extra}


def ann_in_pod(nnodes: str, *args, timeout: float = 300, **extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(ann_cmd(*args), cwd=ROOT, env=ann_env(**pod(nnodes, **extra)), capture_output=True,
                          text=True, timeout=timeout)


def options(work_dir: Path, **changes):
    from anncli.train.loop import TrainOptions

    return TrainOptions(DEMO, work_dir, **changes)


def demo(root: Path, **changes):
    return load_recipe(ROOT / DEMO, tiny_overrides(root, **changes)[1::2])


@pytest.fixture(scope="module")
def checkpointed(tmp_path_factory) -> tuple[Path, Path]:
    """(synthetic set, run directory) of a 1-process run with a checkpoint of effective batch 2."""
    root = tmp_path_factory.mktemp("range")
    run = root / "run"
    done = run_ann("train", DEMO, "--work-dir", run,
                   *tiny_overrides(root / "synth", **{"train.iters": 2, "train.checkpoint_every": 2}))
    assert done.returncode == 0, done.stderr[-3000:]
    return root / "synth", run


def test_a_range_in_which_some_size_cannot_split_the_effective_batch_is_refused_before_launch(tmp_path):
    """Batch 2 on the largest world of 2:4 pods is 8: 3 pods cannot split it. Refused in one line, exit 2,
    naming the sizes that can, both by --dry-run and before torchrun would start."""
    sets = tiny_overrides(tmp_path / "synth")
    why = ("PET_NNODES=2:4 (2 to 4 node(s) x 1 process(es)) cannot keep one effective batch: 3 ranks (3 node(s)) "
           "cannot split 8, the effective batch of its largest world (4 ranks); the sizes that can: 2 or 4 node(s)")
    for dry in (["--dry-run"], []):
        done = ann_in_pod("2:4", "train", DEMO, "--work-dir", tmp_path / "run", *sets, *dry, timeout=120)
        assert done.returncode == 2 and done.stdout == "", done.stderr[-3000:]
        assert done.stderr.count("\n") == 1 and why in done.stderr, done.stderr
        assert "train.accum_steps=3 (effective batch 24" in done.stderr  # 2, 3 and 4 all divide 2 x 4 x 3
    assert not (tmp_path / "run").exists() and not (tmp_path / "synth").exists()  # nothing was started


def test_with_a_range_the_plan_says_what_it_assumes_and_the_split_at_every_size(tmp_path, capsys):
    """PET_NNODES=2:4 with 3 images per rank: the plan assumes 4 pods (effective batch 12) and keeps 12 on 2 and 3."""
    plan = plan_launch(LaunchRequest(argv=["train", DEMO]), pod("2:4"), gpus=lambda: 0)
    assert plan.env["ANN_ELASTIC_WORLD_SIZE"] == "4" and plan.world_size == 4
    describe_plan(demo(tmp_path, **{"train.batch_size": 3}), options(tmp_path / "run"), plan)
    out = capsys.readouterr().out
    assert ("node range:      PET_NNODES=2:4: the job may start, and restart, on 2 to 4 node(s); the plan assumes "
            "the largest, 4 node(s) (4 ranks), and keeps the effective batch 12 at every size") in out
    assert ("at each size:    2 node(s): 3 x 2 ranks x 2 accumulation step(s); 3 node(s): 2 x 3 ranks x 2 "
            "accumulation step(s); 4 node(s): 3 x 4 ranks x 1 accumulation step(s)") in out
    assert "ANN_ELASTIC_WORLD_SIZE=4" in out
    fixed = plan_launch(LaunchRequest(argv=["train", DEMO]), pod("3:3"), gpus=lambda: 0)
    assert "ANN_ELASTIC_WORLD_SIZE" not in fixed.env and not fixed.elastic


def test_a_worker_of_a_range_keeps_the_largest_worlds_effective_batch(tmp_path, monkeypatch):
    recipe = demo(tmp_path, **{"train.batch_size": 2})
    assert run_split(recipe, 2).effective_batch == 4
    monkeypatch.setenv("ANN_ELASTIC_WORLD_SIZE", "8")
    split = run_split(recipe, 2)
    assert (split.batch_size, split.accum_steps, split.effective_batch) == (2, 4, 16)
    assert split.why.endswith("the effective batch of the node range's largest world (8 ranks)")
    monkeypatch.setenv("ANN_ELASTIC_WORLD_SIZE", "eight")
    with pytest.raises(UserError, match="ANN_ELASTIC_WORLD_SIZE='eight'"):
        run_split(recipe, 2)


def test_a_resumed_range_is_checked_against_the_checkpoints_effective_batch(checkpointed):
    synth, run = checkpointed
    recipe = demo(synth, **{"train.iters": 4})
    plan = plan_launch(LaunchRequest(argv=["train", DEMO]), pod("1:2"), gpus=lambda: 0)
    split, resume = plan_split(recipe, options(run), plan)
    assert resume is not None and split.effective_batch == 2 and split.batch_size == 1
    refused = plan_launch(LaunchRequest(argv=["train", DEMO]), pod("2:3"), gpus=lambda: 0)
    with pytest.raises(UserError) as e:
        plan_split(recipe, options(run), refused)
    assert str(e.value) == ("PET_NNODES=2:3 (2 to 3 node(s) x 1 process(es)) cannot keep one effective batch: 3 ranks "
                            "(3 node(s)) cannot split 2, the checkpoint's effective batch; the sizes that can: 2 node(s) "
                            "(2 ranks). Use a range of those sizes (or min == max), or start a new run (--fresh, or "
                            "another --work-dir)")
    assert plan_split(recipe, options(run, fresh=True), refused)[1] is None  # the advice works


def test_the_refusal_of_a_world_names_fresh_or_another_work_dir_and_each_works(checkpointed, tmp_path, capsys):
    """`--resume never` (the old advice) is itself refused in a directory with checkpoints."""
    synth, run = checkpointed
    sets = tiny_overrides(synth, **{"train.iters": 4})
    refused = run_ann("train", DEMO, "--work-dir", run, "--nproc-per-node", 3, "--dry-run", *sets)
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1, refused.stderr
    assert "cannot resume on 3 rank(s)" in refused.stderr and "--resume never" not in refused.stderr
    assert "start a new run: --fresh, or another --work-dir" in refused.stderr
    recipe, three = demo(synth, **{"train.iters": 4}), plan_launch(LaunchRequest(argv=["train"], nproc_per_node=3),
                                                                    {}, gpus=lambda: 0)
    for opts in (options(run, fresh=True), options(tmp_path / "another")):
        split, resume = plan_split(recipe, opts, three)
        assert resume is None and split.effective_batch == 6
    never = run_ann("train", DEMO, "--work-dir", run, "--resume", "never", *sets)
    assert never.returncode == 2 and "already holds checkpoints" in never.stderr


def test_a_new_run_on_fewer_pods_than_the_range_allows_keeps_the_largest_worlds_batch(tmp_path):
    """One pod of PET_NNODES=1:2 starts alone (a real torchrun agent and worker): its effective batch is the one of
    2 pods, 2 x 2 ranks = 4, in 2 accumulation steps, not 2 (how many pods joined first)."""
    work = tmp_path / "run"
    done = ann_in_pod("1:2", "train", DEMO, "--work-dir", work,
                      *tiny_overrides(tmp_path / "synth", **{"train.iters": 1, "train.checkpoint_every": 1}),
                      endpoint=f"127.0.0.1:{free_port()}", PET_RDZV_CONF="last_call_timeout=1")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "1 to 2 node(s) x 1 process(es) = world size 1 to 2" in done.stderr
    start = next(json.loads(line) for line in (work / "events.jsonl").read_text().splitlines()
                 if json.loads(line)["event"] == "start")
    assert (start["world_size"], start["batch_size"], start["accum_steps"], start["effective_batch"]) == (1, 2, 2, 4)
