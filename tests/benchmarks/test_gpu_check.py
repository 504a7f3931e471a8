"""`make gpu-check` (benchmarks/gpu_check.py): refuses cleanly without CUDA; its parts run on CPU with --dry."""

import json
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, ann_env

SCRIPT = ROOT / "benchmarks" / "gpu_check.py"


def run_check(*args, timeout=1200) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True, cwd=ROOT,
                          env=ann_env(), timeout=timeout)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_without_cuda_it_says_so_in_one_line_and_exits_2(tmp_path):
    out = tmp_path / "gpu.json"
    res = run_check("--out", out)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "no CUDA device" in lines[0] and "Traceback" not in res.stderr
    assert not out.exists()


def test_the_makefile_target_runs_the_script():
    text = (ROOT / "Makefile").read_text()
    assert "gpu-check: $(STAMP)\n\t$(PY) benchmarks/gpu_check.py\n" in text


@pytest.mark.slow
def test_dry_run_fills_every_part_of_the_report(tmp_path):
    out = tmp_path / "gpu.json"
    res = run_check("--dry", "--out", out)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["dry"] and report["device"] == "dry-cpu"
    att = report["attention"]
    assert set(att["ratios"]) == {"flops", "memory", "time"} and att["ratios"]["flops"] > 1
    assert att["paper"]["time_ratio"] == 6.0 and att["paper"]["memory_ratio"] == 28.0
    runs = report["train"]["runs"]
    assert set(runs) == {"fp32", "bf16_channels_last"}
    for run in runs.values():
        assert run["img_per_s"] > 0 and run["flops_per_image"] > 0 and "fraction_of_peak" in run
    assert runs["bf16_channels_last"]["channels_last"] and runs["bf16_channels_last"]["precision"] == "bf16"
    evals = report["eval_memory"]["runs"]
    assert set(evals) == {"scale_1.0", "scale_1.75"}
    assert evals["scale_1.75"]["forwards"] > evals["scale_1.0"]["forwards"] >= 4  # more windows at 1.75
    assert all(r["peak_gib"] > 0 for r in evals.values())
    assert report["pytest_gpu"]["exit_code"] == 0 and "skipped" in report["pytest_gpu"]["summary"]
    assert all(report[k]["seconds"] >= 0 for k in ("attention", "train", "eval_memory", "pytest_gpu"))
