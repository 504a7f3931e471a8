"""benchmarks/train_throughput.py and train_step.py: the summaries, the directly built training step, a --quick run."""

import ast
import graphlib
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "train_throughput.py"


def _load(name: str):
    """A benchmark script as a module, with its folder on sys.path as when it runs (it imports its siblings)."""
    if str(SCRIPT.parent) not in sys.path:
        sys.path.insert(0, str(SCRIPT.parent))
    spec = importlib.util.spec_from_file_location(name, SCRIPT.parent / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench():
    return _load("train_throughput")


@pytest.fixture(scope="module")
def step():
    return _load("train_step")


def test_summary_skips_warmup_records_and_keeps_the_peak_memory(step):
    records = [{"step": 2 * i, "img_per_s": rate, "mem_mb": mem}
               for i, (rate, mem) in enumerate([(1.0, 900.0), (10.0, 400.0), (30.0, 410.0), (20.0, 420.0)], 1)]
    out = step.summarize_steps(records, warmup=1)
    assert out["img_per_s_median"] == 20.0
    assert out["records_used"] == 3 and out["last_step"] == 8
    assert out["peak_mem_mb_rank0"] == 900.0
    assert step.summarize_steps(records[:1], warmup=1)["img_per_s_median"] is None


def test_peak_table(bench):
    assert bench.peak_tflops("NVIDIA H100 80GB HBM3")["bf16"] == 989.0
    assert bench.peak_tflops("NVIDIA A100-SXM4-40GB")["fp32"] == 19.5
    assert bench.peak_tflops("Tesla V100-SXM2-16GB") is None


def test_training_step_on_cpu_reports_flops_that_scale_with_pixels(step):
    torch.set_num_threads(1)
    cfg = step.bench_recipe("small", 5, "fp32", False, 2).model
    small, large = step.model_flops_per_image(cfg, (32, 64)), step.model_flops_per_image(cfg, (64, 128))
    assert 3.0 < large / small < 4.2  # convolutions grow with the pixels; the pooled anchors do not
    run = step.measure_training("small", 5, (32, 64), 2, "bf16", True, steps=2, warmup=1, device=torch.device("cpu"))
    assert run["flops_per_image"] == small
    # the rates follow from the JSON's own FLOPs, images and measured seconds
    assert run["img_per_s"] == pytest.approx(2 * 2 / run["seconds_timed"], abs=1e-3)
    assert run["achieved_tflops"] == pytest.approx(small * 2 * 2 / run["seconds_timed"] / 1e12, rel=1e-3, abs=1e-6)
    assert run["s_per_step"] == pytest.approx(run["seconds_timed"] / 2, abs=1e-4)
    assert run["precision"] == "bf16" and run["channels_last"] is True


def test_the_flop_count_matches_the_convolutions_counted_by_hand(step):
    """Independently of torch's FlopCounterMode: every convolution's multiply-adds from its output shape,
    forward once, backward once for the weights and once more for the inputs (except the stem's)."""
    from anncli.models.ann import build_model

    cfg = step.bench_recipe("small", 5, "fp32", False, 2).model
    conv_forward = []

    def count(module, inputs, output):
        k_h, k_w = module.kernel_size
        per_output = 2 * module.in_channels // module.groups * k_h * k_w
        conv_forward.append(per_output * output.numel())

    model = build_model(cfg).train()
    for m in model.modules():
        if isinstance(m, torch.nn.Conv2d):
            m.register_forward_hook(count)
    with torch.no_grad():
        model(torch.zeros(1, 3, 32, 64))
    stem = conv_forward[0]
    by_hand = 3 * sum(conv_forward) - stem  # the image needs no gradient
    counted = step.model_flops_per_image(cfg, (32, 64))
    assert by_hand <= counted <= 1.1 * by_hand  # the rest: attention matmuls, a few percent


@pytest.mark.slow
def test_quick_run_writes_every_setting(tmp_path):
    out = tmp_path / "train.json"
    subprocess.run([sys.executable, str(SCRIPT), "--quick", "--out", str(out)], cwd=ROOT, check=True,
                   capture_output=True, timeout=600)
    result = json.loads(out.read_text())
    assert {"cpu_count", "torch", "load_avg_1min_at_start"} <= result["machine"].keys()
    settings = result["cpu"]["settings"]
    assert set(settings) == {"1rank_all_threads", "1rank_1thread", "2ranks_1thread"}
    for run in settings.values():
        assert run["records"] == 4 and run["img_per_s_median"] > 0 and run["peak_mem_mb_rank0"] > 0
    assert settings["2ranks_1thread"]["ranks"] == 2
    assert result["cpu"]["ratios"]["2ranks_over_1rank_img_per_s"] > 0
    gpu = result["gpu"]
    assert ("skipped" in gpu) != torch.cuda.is_available()
    assert gpu.get("flops_per_image_r101_769", 1) > 0


def test_cli_shards_are_cityscapes_sized_pngs_the_reader_accepts(bench, tmp_path):
    import numpy as np

    from train_cli import write_cityscapes_like_shards

    from anncli.data.counts import shard_counts
    from anncli.data.manifest import resolve_urls
    from anncli.data.shards import decode_sample, iter_shard

    root = write_cityscapes_like_shards(tmp_path / "shards", 3)
    urls = resolve_urls(str(root), "cityscapes", "train")
    assert shard_counts(urls, str(root), announce=False) == [3]
    for key, fields in iter_shard(urls[0]):
        assert fields["img.png"][:4] == b"\x89PNG"
        image, label = decode_sample(key, fields)
        assert image.shape == (1024, 2048, 3) and label.shape == (1024, 2048)
        assert set(np.unique(label)) <= set(range(19)) | {255}


def test_cli_small_sets_cpu_defaults_but_keeps_what_the_command_line_says(bench):
    args = bench.parse_args(["--cli", "--cli-small", "--cli-iters", "6"])
    assert (args.cli_backbone, args.cli_crop, args.cli_iters, args.cli_workers) == ("small", (129, 129), 6, [2])
    full = bench.parse_args(["--cli", "--cli-crop", "513x1025"])
    assert (full.cli_backbone, full.cli_crop, full.cli_precision) == ("resnet101", (513, 1025), "bf16")


def test_no_benchmark_script_imports_itself_through_others():
    """The scripts import their siblings one way (train_throughput and train_cli share train_step.py)."""
    scripts = {p.stem: p for p in SCRIPT.parent.glob("*.py")}
    edges = {}
    for name, path in scripts.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                found |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                found.add(node.module)
        edges[name] = found & scripts.keys() - {name}
    assert edges["train_cli"] and edges["train_throughput"]  # the graph is read at all
    graphlib.TopologicalSorter(edges).prepare()  # CycleError names the circle
