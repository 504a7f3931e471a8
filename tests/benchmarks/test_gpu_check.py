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
    res = run_check("--dry", "--out", out, timeout=1800)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["dry"] and report["device"] == "dry-cpu"
    att = report["attention"]
    assert set(att["ratios"]) == {"flops", "memory", "time"} and att["ratios"]["flops"] > 1
    runs = report["train"]["runs"]
    assert set(runs) == {"fp32", "bf16_channels_last"}
    for run in runs.values():
        assert run["img_per_s"] > 0 and run["flops_per_image"] > 0 and "fraction_of_peak" in run
        assert run["img_per_s"] == pytest.approx(run["batch"] * run["steps_timed"] / run["seconds_timed"], abs=1e-3)
    assert runs["bf16_channels_last"]["channels_last"] and runs["bf16_channels_last"]["precision"] == "bf16"
    evals = report["eval_memory"]["runs"]
    assert set(evals) == {"scale_1.0", "scale_1.75"}
    assert evals["scale_1.75"]["forwards"] > evals["scale_1.0"]["forwards"] >= 4  # more windows at 1.75
    assert all(r["peak_gib"] > 0 for r in evals.values())
    assert report["pytest_gpu"]["exit_code"] == 0 and "skipped" in report["pytest_gpu"]["summary"]
    parts = ("attention", "train", "eval_memory", "matmul", "cudnn", "train_batch8", "eval_protocol", "cli",
             "deepspeed", "compile", "pytest_gpu")
    assert not [p for p in parts if "error" in report[p]], {p: report[p].get("error") for p in parts}
    # the parts ran one after another inside the total (each rounded to 0.1 s)
    assert sum(report[p]["seconds"] for p in parts) <= report["seconds_total"] + 0.05 * len(parts)
    _check_gpu_first_parts(report)


def _check_gpu_first_parts(report: dict) -> None:
    """The new parts and the targets, recomputed from the figures the JSON holds."""
    cudnn = report["cudnn"]
    on, off = cudnn["runs"]["benchmark_on"]["img_per_s"], cudnn["runs"]["benchmark_off"]["img_per_s"]
    assert cudnn["on_over_off_img_per_s"] == pytest.approx(on / off, abs=2e-3)
    batch8 = report["train_batch8"]
    assert batch8["batch"] == 8 and batch8["fraction_of_matmul"] == pytest.approx(
        batch8["flops_per_image"] * batch8["img_per_s"] / 1e12 / report["matmul"]["tflops"], rel=0.02)
    protocol = report["eval_protocol"]
    assert protocol["bf16_over_fp32_speed"] == pytest.approx(
        protocol["fp32_s_per_image"] / protocol["bf16_s_per_image"], rel=0.01)
    cli = report["cli"]
    assert cli["images"]["size"] == "2048x1024" and cli["overrides"]["augment.crop"] == "[65, 65]"
    [run] = cli["cli_runs"]
    assert run["last_step"] == 4 and run["ratio_to_model_only"] == pytest.approx(
        run["img_per_s_median"] / cli["model_only"]["img_per_s"], abs=2e-3)
    assert report["deepspeed"]["run"]["last_step"] == 4
    targets = report["targets"]
    memory = report["attention"]["nonlocal"]["peak_mem_bytes"] / report["attention"]["apnb"]["peak_mem_bytes"]
    assert targets["attention_memory_nonlocal_over_apnb"]["ratio"] == pytest.approx(memory, rel=0.01)
    for name, t in targets.items():
        measured = t.get("ratio", t.get("value"))
        if measured is None:
            assert t["pass"] is None, name
        else:
            assert t["pass"] == (measured >= t["target"] if t["compare"] == ">=" else measured <= t["target"]), name
    assert targets["cli_over_model_only"]["ratio"] == cli["ratio"] and targets["cli_over_model_only"]["target"] == 0.9
    assert targets["eval_bf16_s_per_image"]["target"] == 0.25 and targets["compile_first_step_s"]["target"] == 120
