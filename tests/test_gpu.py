"""Checks that need CUDA: torch's SyncBatchNorm path, mixed precision on the full model, GPU inference,
pinned uint8 batches normalised on the GPU.

Skipped without a GPU; run with `pytest -m gpu` on a machine that has one.
"""

import pytest
import torch
from torch import nn

from anncli.recipe import Recipe

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_syncbn_on_cuda_is_torchs_sync_batchnorm():
    from anncli.cluster.distributed import convert_sync_batchnorm
    from anncli.models.ann import build_model

    model = convert_sync_batchnorm(build_model(Recipe(name="g").model), torch.device("cuda"))
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert norms and all(isinstance(m, nn.SyncBatchNorm) for m in norms)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_full_model_trains_in_mixed_precision_with_finite_losses(precision):
    from anncli.cluster.distributed import init_distributed
    from anncli.train.engine import DDPEngine
    from anncli.train.losses import SegLoss
    from anncli.models.ann import build_model

    recipe = Recipe(name="g", train={"precision": precision, "batch_size": 2},
                    loss={"ohem_min_kept": 10000}, model={"channels_last": True})
    info = init_distributed()
    torch.manual_seed(0)
    model = build_model(recipe.model).to(info.device).to(memory_format=torch.channels_last)
    engine = DDPEngine(model, recipe, info)
    criterion = SegLoss(recipe.loss, 19).to(info.device)
    x = torch.randn(2, 3, 513, 513, device=info.device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 19, (2, 513, 513), device=info.device)
    model.train()
    for _ in range(2):
        stats, finite = engine.micro_step(x, y, criterion, boundary=True)
        assert finite and torch.isfinite(stats).all()
        engine.optimizer_step()


def test_slide_equals_whole_when_the_window_covers_the_image_on_gpu():
    from anncli.eval.inference import Protocol, infer_logits
    from anncli.models.ann import build_model

    torch.manual_seed(0)
    model = build_model(Recipe(name="g", model={"backbone": "resnet50"}).model).cuda().eval()
    image = torch.randn(3, 257, 385, device="cuda")
    whole = infer_logits(model, image, Protocol(scales=(1.0,), flip=False, mode="whole"))
    slide = infer_logits(model, image, Protocol(scales=(1.0,), flip=False, mode="slide", crop=(257, 385),
                                                stride=(200, 300)))
    torch.testing.assert_close(whole, slide, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("workers", [0, 1])
def test_training_stream_hands_out_pinned_uint8_batches_normalised_on_the_gpu(tmp_path, workers):
    from anncli.data.global_stream import GlobalStream
    from anncli.data.counts import shard_counts
    from anncli.data.manifest import resolve_urls
    from anncli.data.synth import write_synth
    from anncli.data.transforms import normalize_batch
    from anncli.recipe import AugmentConfig

    write_synth(tmp_path, train=8, val=4, size=(32, 64), seed=0, max_samples=8, verbose=False)
    aug = AugmentConfig(crop=(32, 64))
    urls = resolve_urls(str(tmp_path), "synth", "train")
    stream = GlobalStream(urls, shard_counts(urls, tmp_path), augment=aug, batch_size=2, effective_batch=2, seed=0,
                          rank=0, world_size=1, num_workers=workers, pin_memory=True)
    it = iter(stream)
    batch = next(it)
    it.close()
    assert batch["image"].dtype == batch["label"].dtype == torch.uint8
    assert batch["image"].is_pinned() and batch["label"].is_pinned()
    on_gpu = normalize_batch(batch["image"].cuda(non_blocking=True), aug.mean, aug.std, aug.bgr, channels_last=True)
    assert on_gpu.is_cuda and on_gpu.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(on_gpu.cpu(), normalize_batch(batch["image"], aug.mean, aug.std, aug.bgr))
