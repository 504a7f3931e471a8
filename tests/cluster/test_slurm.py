"""The sbatch templates on a real two-node SLURM cluster started on this host (tests/cluster/slurm_cluster.py)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from slurm_cluster import slurm_cluster  # noqa: E402,F401  (the fixture)

from anncli.errors import EXIT_PREEMPTED  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
TRAIN_SH, EVAL_SH, RECIPE = ROOT / "slurm" / "train.sh", ROOT / "slurm" / "eval.sh", ROOT / "recipes" / "demo.yaml"
# CPU-only test cluster: no GPUs, one core per fake node.
CPU_ONLY = ["--gpus-per-node=0", "--cpus-per-task=1"]
ITERS, EVERY = 16, 4


def sets(synth: Path, *extra: str) -> list[str]:
    pairs = [f"train.iters={ITERS}", f"train.checkpoint_every={EVERY}", "train.keep_last=10", "train.batch_size=2",
             "train.log_every=1", "train.trace_samples=true", "data.synth.train=64", "data.synth.val=16",
             f"data.root={synth}", *extra]
    return [a for p in pairs for a in ("--set", p)]


def job_env() -> dict[str, str]:
    return {"ANN": str(Path(sys.executable).parent / "ann"), "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}


def submit(cluster, cwd: Path, name: str, script: Path, *args: str) -> str:
    return cluster.sbatch(["-J", name, *CPU_ONLY, str(script), *args], cwd=cwd, env=job_env())


def finish(cluster, job: str, cwd: Path, timeout: float = 900) -> tuple[dict, str]:
    info = cluster.wait(job, timeout)
    log = "\n".join(p.read_text(errors="replace") for p in cwd.glob(f"slurm-*-{job}.out"))
    return info, log


def complete_steps(run: Path) -> list[str]:
    return sorted(p.parent.name for p in (run / "checkpoints").glob("step-*/COMPLETE"))


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """Jobs are submitted from here, so run directories (runs/<job>-demo) and logs land here."""
    return tmp_path_factory.mktemp("slurmjobs")


@pytest.fixture(scope="module")
def synth(workspace) -> Path:
    root = workspace / "synth"
    subprocess.run([sys.executable, "-m", "anncli", "data", "synth", str(root), "--train", "64", "--val", "16",
                    "--size", "64x128"], check=True, capture_output=True, timeout=300)
    return root


@pytest.fixture(scope="module")
def ddp_run(slurm_cluster, workspace, synth) -> Path:
    """An uninterrupted two-node DDP run: the reference for the evaluation and preemption tests."""
    job = submit(slurm_cluster, workspace, "ddp", TRAIN_SH, str(RECIPE), *sets(synth))
    info, log = finish(slurm_cluster, job, workspace)
    assert info["JobState"] == "COMPLETED", f"{info}\n{log[-4000:]}"
    return workspace / "runs" / "ddp-demo"


def test_template_requeues_on_the_preemption_exit_code():
    text = TRAIN_SH.read_text()
    assert f"EXIT_PREEMPTED={EXIT_PREEMPTED}" in text and 'scontrol requeue "$SLURM_JOB_ID"' in text
    for line in ("--requeue", "--signal=TERM@", "--open-mode=append", "--ntasks-per-node=1"):
        assert f"#SBATCH {line}" in text


@pytest.mark.parametrize("requeue_rc", [0, 1])
def test_a_failed_requeue_ends_the_job_non_zero_and_says_so(tmp_path, requeue_rc):
    """train.sh's requeue branch with `ann` ending preempted (124) and an `scontrol` on PATH that fails; not
    the real cluster: slurmctld accepts every requeue of a --requeue job."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake_ann = bin_dir / "ann"
    fake_ann.write_text(f'#!/bin/sh\nfor a; do [ "$a" = --dry-run ] && echo --- && exit 0; done\nexit {EXIT_PREEMPTED}\n')
    scontrol = bin_dir / "scontrol"
    scontrol.write_text(f"#!/bin/sh\necho \"$@\" >> {tmp_path / 'scontrol.log'}\n"
                        f"[ {requeue_rc} = 0 ] || echo 'slurm_requeue error: Requested operation is presently disabled' >&2\n"
                        f"exit {requeue_rc}\n")
    for f in (fake_ann, scontrol):
        f.chmod(0o755)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "SLURM_JOB_ID": "77", "ANN": str(fake_ann), "WORK_DIR": str(tmp_path / "run")}
    done = subprocess.run(["bash", str(TRAIN_SH), str(RECIPE)], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert (tmp_path / "scontrol.log").read_text() == "requeue 77\n"
    if requeue_rc == 0:
        assert done.returncode == 0, done.stderr
    else:
        assert done.returncode == EXIT_PREEMPTED
        assert "'scontrol requeue 77' failed; the run is unfinished" in done.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize("script", [TRAIN_SH, EVAL_SH])
def test_templates_print_usage(script):
    done = subprocess.run(["bash", str(script), "-h"], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.startswith("usage: sbatch")
    done = subprocess.run(["bash", str(script), "no/such/recipe.yaml"], capture_output=True, text=True)
    assert done.returncode == 2 and "recipe 'no/such/recipe.yaml' not found" in done.stderr


@pytest.mark.slurm
@pytest.mark.slow
def test_train_on_two_nodes_completes_with_a_checkpoint(ddp_run):
    assert complete_steps(ddp_run)[-1] == f"step-{ITERS:06d}"
    state = json.loads((ddp_run / "checkpoints" / f"step-{ITERS:06d}" / "state.json").read_text())
    assert state["world_size"] == 2 and state["engine"] == "ddp"


@pytest.mark.slurm
@pytest.mark.slow
def test_deepspeed_on_two_nodes_completes_with_a_checkpoint(slurm_cluster, workspace, synth):
    job = submit(slurm_cluster, workspace, "ds", TRAIN_SH, str(RECIPE),
                 *sets(synth, "engine=deepspeed", "deepspeed.zero_stage=2", "train.iters=4"))
    info, log = finish(slurm_cluster, job, workspace, timeout=1200)
    assert info["JobState"] == "COMPLETED", f"{info}\n{log[-4000:]}"
    run = workspace / "runs" / "ds-demo"
    assert complete_steps(run)[-1] == "step-000004"
    assert json.loads((run / "checkpoints" / "step-000004" / "state.json").read_text())["world_size"] == 2


@pytest.mark.slurm
@pytest.mark.slow
def test_eval_on_two_nodes_writes_metrics_into_the_run(slurm_cluster, workspace, synth, ddp_run):
    job = submit(slurm_cluster, workspace, "ddp", EVAL_SH, str(RECIPE), *sets(synth), "--scales", "0.75,1.0")
    info, log = finish(slurm_cluster, job, workspace)
    assert info["JobState"] == "COMPLETED", f"{info}\n{log[-4000:]}"
    metrics = json.loads((ddp_run / f"eval-step-{ITERS:06d}-ms-flip.json").read_text())
    assert 0.0 <= metrics["mIoU"] <= 1.0 and metrics["world_size"] == 2 and metrics["samples"] == 16
    assert f"step-{ITERS:06d}" in metrics["checkpoint"]


@pytest.mark.slurm
@pytest.mark.slow
def test_preempted_job_saves_requeues_resumes_and_matches_an_uninterrupted_run(slurm_cluster, workspace, synth, ddp_run):
    import torch

    run = workspace / "runs" / "pre-demo"
    job = submit(slurm_cluster, workspace, "pre", TRAIN_SH, str(RECIPE), *sets(synth))
    deadline = time.monotonic() + 600
    while not complete_steps(run):
        assert time.monotonic() < deadline and slurm_cluster.job(job).get("JobState") in ("PENDING", "RUNNING")
        time.sleep(0.2)
    slurm_cluster.run(["scancel", "--signal=TERM", job])
    info, log = finish(slurm_cluster, job, workspace, timeout=1200)
    assert info["JobState"] == "COMPLETED", f"{info}\n{log[-4000:]}"
    assert int(info["Restarts"]) == 1, log[-4000:]
    saved = re.search(r"preempted at step (\d+): checkpoint saved", log)
    assert saved and 0 < int(saved.group(1)) < ITERS, log[-4000:]
    step = int(saved.group(1))
    assert "requeueing it" in log and "restart 1:" in log
    assert re.search(rf"resumed from \S*runs/pre-demo/checkpoints/step-{step:06d} at step {step}\b", log), log[-4000:]
    final = f"step-{ITERS:06d}"
    assert complete_steps(run)[-1] == final
    got = torch.load(run / "checkpoints" / final / "model.pt", weights_only=True)
    want = torch.load(ddp_run / "checkpoints" / final / "model.pt", weights_only=True)
    assert got.keys() == want.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=1e-6, msg=key)


def traces(run: Path) -> dict[int, str]:
    """The last sample trace of every step (a step re-run after a preemption is logged twice)."""
    events = [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()]
    return {e["step"]: e["samples_sha256"] for e in events if e["event"] == "step"}


@pytest.mark.slurm
@pytest.mark.slow
def test_a_job_preempted_on_two_nodes_finishes_on_one_with_the_same_samples(slurm_cluster, workspace, synth, ddp_run):
    run = workspace / "runs" / "elastic-demo"
    job = submit(slurm_cluster, workspace, "elastic", TRAIN_SH, str(RECIPE), *sets(synth))  # 2 nodes
    deadline = time.monotonic() + 600
    while not complete_steps(run):
        assert time.monotonic() < deadline and slurm_cluster.job(job).get("JobState") in ("PENDING", "RUNNING")
        time.sleep(0.2)
    assert slurm_cluster.job(job)["NumNodes"] == "2"
    # A node leaves while the job runs; the preempted job requeues itself and, shrunk to 1 node while it
    # waits (a --nodes=1-2 range starts on the minimum here, so it could not start on 2), comes back on the
    # node that is left.
    slurm_cluster.run(["scontrol", "update", "NodeName=node2", "State=DRAIN", "Reason=elastic-test"])
    try:
        slurm_cluster.run(["scancel", "--signal=TERM", job])
        while not (slurm_cluster.job(job).get("JobState") == "PENDING" and slurm_cluster.job(job).get("Restarts") == "1"):
            assert time.monotonic() < deadline + 600, slurm_cluster.job(job)
            time.sleep(0.2)
        for change in ("NumTasks=1", "NumCPUs=1", "NumNodes=1"):  # the 2-node job's tasks and CPUs first
            slurm_cluster.run(["scontrol", "update", f"JobId={job}", change])
        info, log = finish(slurm_cluster, job, workspace, timeout=1200)
    finally:
        slurm_cluster.run(["scontrol", "update", "NodeName=node2", "State=RESUME"], check=False)
    assert info["JobState"] == "COMPLETED", f"{info}\n{log[-4000:]}"
    assert int(info["Restarts"]) == 1 and info["NumNodes"] == "1", log[-4000:]
    saved = re.search(r"preempted at step (\d+): checkpoint saved", log)
    assert saved and 0 < int(saved.group(1)) < ITERS, log[-4000:]
    assert re.search(r"written by 2 ranks; 2 x 1 ranks x 2 accumulation step\(s\) = 4", log), log[-4000:]
    assert complete_steps(run)[-1] == f"step-{ITERS:06d}"
    got, want = traces(run), traces(ddp_run)
    assert sorted(got) == list(range(1, ITERS + 1)) and got == want

