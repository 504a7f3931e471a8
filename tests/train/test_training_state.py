"""Training state that a bad micro-batch or a new world could spoil: batch-norm buffers of a skipped
micro-batch, non-finite checkpoints, the data position after a skip, and the plan of a resume."""

import os
import uuid

import pytest
import torch
from torch.distributed.launcher.api import LaunchConfig, elastic_launch

from anncli.errors import UserError
from anncli.recipe import Recipe, load_recipe

DEMO = "recipes/demo.yaml"


def _demo(*sets: str) -> Recipe:
    return load_recipe(DEMO, list(sets))


def _buffers(module) -> dict:
    return {k: v.detach().clone() for k, v in module.state_dict().items() if "running_" in k or "num_batches" in k}


def _skip_worker(out_dir: str, engine_name: str) -> None:
    """Every rank: one micro-batch whose images hold inf on rank 1 only (sync-BN spreads its statistics to
    rank 0 in the forward), then one good one. Saves the buffers before, after the bad and after the good."""
    from anncli.cluster.distributed import convert_sync_batchnorm, init_distributed
    from anncli.models.ann import build_model
    from anncli.train.engine import build_engine
    from anncli.train.losses import SegLoss

    torch.set_num_threads(1)
    info = init_distributed()
    recipe = _demo("train.batch_size=2", f"engine={engine_name}")
    torch.manual_seed(0)
    model = convert_sync_batchnorm(build_model(recipe.model), info.device)
    engine = build_engine(model, recipe, info)
    criterion = SegLoss(recipe.loss, recipe.model.num_classes)
    g = torch.Generator().manual_seed(info.rank)
    images, labels = torch.randn(2, 3, 32, 64, generator=g), torch.randint(0, 5, (2, 32, 64), generator=g)
    model.train()
    before = _buffers(model)
    bad = images.clone()
    if info.rank == 1:
        bad[0, :, :4, :4] = float("inf")
    _, bad_finite = engine.micro_step(bad, labels, criterion, boundary=True)
    after_bad = _buffers(model)
    _, good_finite = engine.micro_step(images, labels, criterion, boundary=True)
    torch.save({"before": before, "after_bad": after_bad, "after_good": _buffers(model),
                "finite": (bad_finite, good_finite)}, os.path.join(out_dir, f"rank{info.rank}.pt"))


@pytest.mark.parametrize("engine", ["ddp", pytest.param("deepspeed", marks=pytest.mark.slow)])
def test_a_skipped_micro_batch_leaves_no_trace_in_batch_norm_on_any_rank(tmp_path, engine):
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    cfg = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=2, run_id=str(uuid.uuid4()),
                       rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0, monitor_interval=0.1)
    elastic_launch(cfg, entrypoint=_skip_worker)(str(tmp_path), engine)
    for rank in (0, 1):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert got["finite"] == (False, True)
        for key, value in got["before"].items():
            assert torch.equal(got["after_bad"][key], value), (rank, key)  # bitwise: nothing of the bad forward
        assert all(torch.isfinite(v.float()).all() for v in got["after_good"].values())
        assert any(not torch.equal(got["after_good"][k], v) for k, v in got["before"].items())  # a good one counts


@pytest.fixture(scope="module")
def run_b2x2(tmp_path_factory):
    """A finished 1-rank run: per-rank batch 2 x 2 accumulation steps = effective batch 4, BN over 2 images."""
    from conftest import run_ann, tiny_overrides

    root = tmp_path_factory.mktemp("state")
    run = root / "run"
    res = run_ann("train", DEMO, "--work-dir", run, *tiny_overrides(
        root / "synth", **{"train.iters": 2, "train.checkpoint_every": 2, "train.accum_steps": 2}))
    assert res.returncode == 0, res.stderr[-3000:]
    return root, run


def test_fresh_is_planned_as_a_new_run_not_a_resume(run_b2x2):
    from conftest import run_ann, tiny_overrides

    root, run = run_b2x2
    plan = run_ann("train", DEMO, "--work-dir", run, "--fresh", "--nproc-per-node", 3, "--dry-run",
                   *tiny_overrides(root / "synth", **{"train.iters": 2}))
    assert plan.returncode == 0, plan.stderr
    assert "2 x 3 ranks x 1 accumulation step(s) = 6" in plan.stdout and "resuming" not in plan.stdout


def test_a_resume_that_changes_the_batch_norm_batch_says_so_and_how_to_keep_it(run_b2x2):
    from conftest import run_ann, tiny_overrides

    root, run = run_b2x2
    args = ["train", DEMO, "--work-dir", run, *tiny_overrides(root / "synth", **{"train.iters": 4})]
    plan = run_ann(*args, "--set", "train.batch_size=4", "--set", "train.accum_steps=1", "--dry-run")
    assert plan.returncode == 0, plan.stderr
    note = "batch-norm statistics over 4 images per batch instead of the checkpoint's 2 (syncbn); " \
           "set train.batch_size=2 to keep 2"
    assert f"batch norm:      {note}" in plan.stdout
    same = run_ann(*args, "--dry-run")  # the recipe's own split keeps it: nothing to say
    assert same.returncode == 0 and "batch norm:" not in same.stdout
    resumed = run_ann(*args, "--set", "train.batch_size=4", "--set", "train.accum_steps=1")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert note in resumed.stderr


def test_a_data_position_no_split_of_this_world_can_continue_is_refused_by_the_plan():
    from anncli.runs.checkpoint import SavedSplit
    from anncli.train.plan import run_split

    recipe = _demo("train.batch_size=4")
    assert run_split(recipe, 2, SavedSplit(8, 1, 4, 8)).batch_size == 4
    assert run_split(recipe, 2, SavedSplit(8, 1, 4, 12)).batch_size == 2  # a smaller micro-batch continues it
    with pytest.raises(UserError, match="stopped at global sample 12, which 8 ranks cannot continue"):
        run_split(recipe, 8, SavedSplit(16, 1, 4, 12))


def test_a_skipped_micro_batch_keeps_the_data_position_on_the_grid_of_the_effective_batch(tmp_path):
    """Effective batch 4 = 2 x 1 rank x 2 steps; the second micro-batch's loss is made non-finite: it is skipped,
    not replaced by the next one, so the position moves on to 4, where every split of 4 can continue."""
    from conftest import tiny_overrides
    from anncli.cluster.distributed import init_distributed
    from anncli.train import loop
    from anncli.train.step import train_step

    sets = tiny_overrides(tmp_path / "synth", **{"train.accum_steps": 2})[1::2]
    recipe = load_recipe(DEMO, sets)
    opts = loop.TrainOptions(DEMO, work_dir=tmp_path / "run")
    run = loop._set_up(recipe, opts, init_distributed(), loop.StopFlag())
    calls, criterion = [], run.criterion

    def second_call_overflows(*args, **kwargs):
        total, parts = criterion(*args, **kwargs)
        calls.append(1)
        return (total * float("inf") if len(calls) == 2 else total), parts

    run.criterion = second_call_overflows
    try:
        result = train_step(run, 0)
        assert result.finite.tolist() == [True, False] and len(calls) == 2  # kept, skipped
        assert not bool(result.applied)
        assert run.stream.state_dict()["next_sample"] == 4
    finally:
        run.close()


def _gradient_skip_worker(out_dir: str, engine_name: str, zero_stage: int) -> None:
    """Every rank: a good step, then a step whose loss is finite everywhere but whose gradient of one weight
    is NaN on rank 1 only (under ZeRO only that weight's partition owner sees it after the reduction), then a
    good step. Saves the weights after each step."""
    from anncli.cluster.distributed import init_distributed
    from anncli.models.ann import build_model
    from anncli.train.engine import build_engine
    from anncli.train.losses import SegLoss

    torch.set_num_threads(1)
    info = init_distributed()
    recipe = _demo("train.batch_size=2", f"engine={engine_name}", f"deepspeed.zero_stage={zero_stage}",
                   "model.norm=bn", "optim.name=sgd")
    torch.manual_seed(0)
    model = build_model(recipe.model)
    engine = build_engine(model, recipe, info)
    criterion = SegLoss(recipe.loss, recipe.model.num_classes)
    g = torch.Generator().manual_seed(info.rank)
    images, labels = torch.randn(2, 3, 32, 64, generator=g), torch.randint(0, 5, (2, 32, 64), generator=g)
    model.train()
    weights, applied = [], []
    last = list(model.parameters())[-1]
    for poisoned in (False, True, False):
        hook = last.register_hook(lambda grad: grad * float("nan")) if poisoned and info.rank == 1 else None
        engine.micro_step(images, labels, criterion, boundary=True)
        applied.append(bool(engine.optimizer_step()))
        if hook:
            hook.remove()
        weights.append({k: v.detach().clone() for k, v in model.named_parameters()})  # BN buffers of a finite forward stay
    torch.save({"weights": weights, "applied": applied}, os.path.join(out_dir, f"rank{info.rank}.pt"))


@pytest.mark.parametrize("engine,zero_stage", [("ddp", 0), pytest.param("deepspeed", 1, marks=pytest.mark.slow),
                                               pytest.param("deepspeed", 2, marks=pytest.mark.long)])
def test_a_non_finite_gradient_on_one_rank_skips_the_step_on_every_rank(tmp_path, engine, zero_stage):
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    cfg = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=2, run_id=str(uuid.uuid4()),
                       rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0, monitor_interval=0.1)
    elastic_launch(cfg, entrypoint=_gradient_skip_worker)(str(tmp_path), engine, zero_stage)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    for got in ranks:
        assert got["applied"] == [True, False, True]
        first, skipped, last = got["weights"]
        assert all(torch.equal(first[k], skipped[k]) for k in first)  # the skipped step changed nothing
        assert all(torch.isfinite(v.float()).all() for v in last.values())
        assert any(not torch.equal(first[k], last[k]) for k in first)
    for k, v in ranks[0]["weights"][-1].items():  # and every rank holds the same weights
        assert torch.equal(v, ranks[1]["weights"][-1][k]), k
