"""Sliding windows in batches: the same logits as one window at a time, the batch size from
`eval.batch_windows`, and bf16 evaluation within 0.1 mIoU points of fp32 on the demo set."""

import json

import pytest
import torch

from anncli.eval.inference import CPU_BATCH_WINDOWS, Protocol, infer_logits, windows_per_batch
from anncli.models.ann import build_model
from anncli.recipe import ModelConfig, RecipeError, load_recipe
from conftest import ROOT, run_ann, tiny_overrides

torch.set_num_threads(1)


class CountingNet(torch.nn.Module):
    """The small ANN, recording the batch size of every forward."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = build_model(ModelConfig(backbone="small", num_classes=5, key_channels=16, value_channels=32,
                                           norm="bn", aux=False)).eval()
        for m in self.net.modules():  # non-zero output convs: the attention takes part in the logits
            if hasattr(m, "W") and isinstance(m.W, torch.nn.Conv2d):
                torch.nn.init.normal_(m.W.weight, std=0.1)
        self.batches = []

    def forward(self, x):
        self.batches.append(x.shape[0])
        return self.net(x)


# (height, width, crop, stride) -> windows per view: 2 x 1, 2 x 3 and 3 x 4 (borders aligned)
LAYOUTS = [((48, 40), (32, 40), (16, 16), 2), ((48, 72), (32, 32), (16, 20), 6), ((56, 80), (24, 32), (16, 16), 12)]


@pytest.mark.parametrize("size, crop, stride, windows", LAYOUTS)
def test_batched_windows_give_the_logits_of_one_window_at_a_time(size, crop, stride, windows):
    model = CountingNet()
    image = torch.randn(3, *size, generator=torch.Generator().manual_seed(2))
    protocol = dict(mode="slide", crop=crop, stride=stride, flip=True)
    single = infer_logits(model, image, Protocol(**protocol, batch_windows=1))
    assert model.batches == [1] * (2 * windows)  # two views (flip), every window alone
    model.batches.clear()
    batched = infer_logits(model, image, Protocol(**protocol, batch_windows=5))  # 5 divides none of the counts
    per_view = [min(5, windows - i) for i in range(0, windows, 5)]
    assert model.batches == per_view * 2
    assert batched.dtype == torch.float32
    torch.testing.assert_close(batched, single, rtol=0, atol=1e-5)


def test_windows_per_batch_setting():
    cpu = torch.device("cpu")
    assert windows_per_batch(3, 12, (512, 512), cpu) == 3
    assert windows_per_batch(32, 12, (512, 512), cpu) == 12  # never more than the view's windows
    assert windows_per_batch("auto", 12, (512, 512), cpu) == CPU_BATCH_WINDOWS
    assert windows_per_batch("auto", 2, (512, 512), cpu) == 2


def test_recipe_key_eval_batch_windows():
    demo = ROOT / "recipes" / "demo.yaml"
    assert load_recipe(demo).eval.batch_windows == "auto"
    assert load_recipe(demo, ["eval.batch_windows=6"]).eval.batch_windows == 6
    for bad in ("0", "true", "many"):
        with pytest.raises(RecipeError, match="eval.batch_windows: .*auto or an integer >= 1"):
            load_recipe(demo, [f"eval.batch_windows={bad}"])
    protocol = Protocol.from_recipe(load_recipe(demo, ["eval.batch_windows=3"]))
    assert protocol.batch_windows == 3 and protocol.channels_last is True  # demo.yaml: channels_last: true


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_auto_batches_from_free_cuda_memory_in_channels_last():
    cuda = torch.device("cuda")
    assert windows_per_batch("auto", 12, (64, 64), cuda) == 12  # a few MiB each: all of them
    assert windows_per_batch("auto", 10**9, (864, 864), cuda) >= 1
    model = CountingNet().net.to(cuda, memory_format=torch.channels_last)
    image = torch.randn(3, 96, 128, device=cuda)
    protocol = Protocol(mode="slide", crop=(64, 64), stride=(32, 32), precision="bf16")
    batched = infer_logits(model, image, protocol)
    single = infer_logits(model, image, Protocol(mode="slide", crop=(64, 64), stride=(32, 32), batch_windows=1))
    assert batched.dtype == torch.float32
    assert (batched.argmax(0) == single.argmax(0)).float().mean() > 0.99


@pytest.mark.slow
def test_bf16_evaluation_is_within_a_tenth_of_a_point_of_fp32(tmp_path):
    """A short demo run (about a minute on 2 cores), then fp32 and bf16 sliding-window evaluation.

    The JSON holds mIoU as a fraction (UNITS in eval/evaluate.py; the table prints percent), so 0.1
    mIoU points is 0.001 here."""
    sets = tiny_overrides(tmp_path / "synth", **{
        "data.synth.train": 512, "data.synth.val": 48, "data.synth.size": "[64, 128]", "augment.crop": "[64, 128]",
        "train.batch_size": 8, "train.iters": 120, "train.checkpoint_every": 120, "train.log_every": 40,
        "eval.mode": "slide", "eval.crop": "[64, 64]", "eval.stride": "[32, 32]"})
    work = tmp_path / "run"
    res = run_ann("train", "recipes/demo.yaml", "--work-dir", work, *sets)
    assert res.returncode == 0, res.stderr[-3000:]
    reports = {}
    for precision in ("fp32", "bf16"):
        out = tmp_path / f"{precision}.json"
        res = run_ann("eval", "recipes/demo.yaml", "--work-dir", work, *sets, "--set", f"eval.precision={precision}",
                      "--json", out)
        assert res.returncode == 0, res.stderr[-3000:]
        reports[precision] = json.loads(out.read_text())
    fp32, bf16 = reports["fp32"], reports["bf16"]
    print(f"demo mIoU: fp32 {fp32['mIoU']:.6f}, bf16 {bf16['mIoU']:.6f}")
    assert fp32["units"]["mIoU"] == "fraction" and bf16["protocol"]["precision"] == "bf16"
    assert fp32["mIoU"] > 0.3, fp32["mIoU"]  # a model that learned something, not a constant prediction
    assert abs(bf16["mIoU"] - fp32["mIoU"]) <= 0.001, (fp32["mIoU"], bf16["mIoU"])
