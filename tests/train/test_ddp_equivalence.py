"""2 DDP ranks (gloo, all-reduce BN) equal 1 process with the same effective batch.

Each rank gets half of a fixed batch; the single process gets all of it. Every pixel is labelled, so the
mean of the per-rank losses equals the loss of the whole batch, and DDP's averaged gradients equal the
single-process gradients. Tolerance: 1e-5 absolute on weights after 3 SGD steps (float32 reduction order).
"""

import os
import uuid

import torch
from torch.distributed.launcher.api import LaunchConfig, elastic_launch

from anncli.recipe import Recipe

STEPS = 3


def _recipe() -> Recipe:
    return Recipe(name="eq", model={"backbone": "small", "num_classes": 5, "key_channels": 8, "value_channels": 8,
                                    "dropout": 0.0, "norm": "syncbn"},
                  loss={"ohem": False}, optim={"name": "sgd", "lr": 0.05, "weight_decay": 1e-4},
                  train={"batch_size": 4, "world_size": 1})


def _data():
    g = torch.Generator().manual_seed(7)
    images = torch.randn(STEPS, 4, 3, 32, 64, generator=g)
    labels = torch.randint(0, 5, (STEPS, 4, 32, 64), generator=g)
    return images, labels


def _train(rank: int, world: int) -> dict:
    from anncli.cluster.distributed import convert_sync_batchnorm, init_distributed
    from anncli.train.engine import DDPEngine
    from anncli.train.losses import SegLoss
    from anncli.models.ann import build_model

    torch.set_num_threads(1)
    info = init_distributed()
    recipe = _recipe()
    torch.manual_seed(0)
    model = build_model(recipe.model)
    if world > 1:
        model = convert_sync_batchnorm(model, info.device)
    engine = DDPEngine(model, recipe, info)
    criterion = SegLoss(recipe.loss, 5)
    images, labels = _data()
    per = 4 // world
    model.train()
    for step in range(STEPS):
        x = images[step, rank * per:(rank + 1) * per]
        y = labels[step, rank * per:(rank + 1) * per]
        _, finite = engine.micro_step(x, y, criterion, boundary=True)
        assert finite
        engine.optimizer_step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _worker(out_dir: str) -> None:
    from anncli.cluster.distributed import teardown

    state = _train(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]))
    torch.save(state, os.path.join(out_dir, f"rank{os.environ['RANK']}.pt"))
    teardown()


def test_two_ddp_ranks_match_one_process(tmp_path):
    cfg = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=2, run_id=str(uuid.uuid4()), rdzv_backend="c10d",
                       rdzv_endpoint="localhost:0", max_restarts=0, monitor_interval=0.1)
    elastic_launch(cfg, entrypoint=_worker)(str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    single = _train(0, 1)
    moved = 0
    initial = _initial_state()
    for key, value in single.items():
        assert torch.equal(ranks[0][key], ranks[1][key]), f"ranks disagree on {key}"
        torch.testing.assert_close(ranks[0][key], value, atol=1e-5, rtol=1e-4, msg=f"{key} differs")
        moved += int(not torch.equal(value, initial[key]))
    assert moved > len(single) // 2  # the comparison is not between untrained weights


def _initial_state() -> dict:
    from anncli.models.ann import build_model

    torch.manual_seed(0)
    return build_model(_recipe().model).state_dict()


class _NoNormNet(torch.nn.Module):
    """A BN-free segmentation net, so that micro-batches and one big batch see the same numerics."""

    def __init__(self):
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 5, 1))

    def forward(self, x):
        return self.body(x), None


def _steps_with_accumulation(accum: int) -> dict:
    from anncli.cluster.distributed import init_distributed
    from anncli.train.engine import DDPEngine
    from anncli.train.losses import SegLoss

    recipe = Recipe(name="acc", loss={"ohem": False, "aux_weight": 0.0}, optim={"name": "sgd", "lr": 0.1},
                    train={"batch_size": 4 // accum, "accum_steps": accum})
    torch.manual_seed(0)
    model = _NoNormNet()
    engine = DDPEngine(model, recipe, init_distributed())
    criterion = SegLoss(recipe.loss, 5)
    images, labels = _data()
    per = 4 // accum
    for step in range(STEPS):
        for micro in range(accum):
            part = slice(micro * per, (micro + 1) * per)
            _, finite = engine.micro_step(images[step, part], labels[step, part], criterion,
                                          boundary=micro + 1 == accum)
            assert finite
        engine.optimizer_step()
    return model.state_dict()


def test_gradient_accumulation_equals_the_whole_batch():
    whole, accumulated = _steps_with_accumulation(1), _steps_with_accumulation(2)
    for key in whole:
        torch.testing.assert_close(accumulated[key], whole[key], atol=1e-6, rtol=1e-5)
    assert not torch.equal(whole["body.0.weight"], _NoNormNet().state_dict()["body.0.weight"])
