"""`ann train --compile`: a compiled network trains, checkpoints plain state dicts, resumes bit for bit,
and its checkpoints evaluate and export like any other.

On CPU the runs use `model.compile_backend: aot_eager` (dynamo and AOTAutograd as with inductor, eager
kernels): inductor's C++ build of the network takes minutes on a small CPU.
"""

import shutil

import pytest

from conftest import run_ann, tiny_overrides
from test_train import _assert_bitwise_equal, _events, _final_weights


def test_compile_flag_sets_the_recipe_key_and_a_bad_backend_is_one_line(tmp_path, synth_root):
    sets = tiny_overrides(synth_root)
    res = run_ann("train", "recipes/demo.yaml", "--compile", *sets, "--dry-run")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "compile: true" in res.stdout
    res = run_ann("train", "recipes/demo.yaml", "--work-dir", tmp_path / "run", "--compile", *sets,
                  "--set", "model.compile_backend=no-such-backend")
    assert res.returncode == 2, res.stderr[-3000:]
    assert "model.compile_backend 'no-such-backend': not a torch.compile backend" in res.stderr
    assert "Traceback" not in res.stderr


@pytest.mark.long  # minutes of compilation on 2 CPU cores: `make test-long`
def test_compiled_training_resumes_bitwise_and_its_checkpoint_evaluates_and_exports(tmp_path, synth_root):
    """About two minutes on 2 cores: two compiled runs, one eager run, eval and export."""
    sets = tiny_overrides(synth_root, **{"train.iters": 4, "train.checkpoint_every": 2})
    compiled = ["train", "recipes/demo.yaml", "--compile", "--set", "model.compile_backend=aot_eager", *sets]
    run = tmp_path / "compiled"
    res = run_ann(*compiled, "--work-dir", run)
    assert res.returncode == 0, res.stderr[-3000:]
    uninterrupted = _final_weights(run, 4)
    assert not any(k.startswith("_orig_mod.") for k in uninterrupted)

    eager = tmp_path / "eager"
    res = run_ann("train", "recipes/demo.yaml", *sets, "--work-dir", eager)
    assert res.returncode == 0, res.stderr[-3000:]
    reference = _final_weights(eager, 4)
    assert uninterrupted.keys() == reference.keys()  # the same plain keys as an eager run's
    # The first step sees the same weights, samples and dropout seed: the same loss up to rounding. (Weights
    # are not compared: AdamW divides by the gradients' magnitude, so the rounding noise of a gradient that
    # is zero in exact arithmetic, a conv bias before BN, becomes an update of the LR's size.)
    losses = [[(e["loss"], e["aux_loss"]) for e in _events(r) if e["event"] == "step"] for r in (run, eager)]
    print("first-step losses (compiled, eager):", losses[0][0], losses[1][0])
    for ours, theirs in zip(*(steps[0] for steps in losses)):
        assert abs(ours - theirs) <= 1e-4 * abs(theirs), losses

    # resume at step 2 in a new process (a fresh compile) and end where the uninterrupted run ended
    shutil.move(run / "checkpoints" / "step-000004", tmp_path / "step-000004")
    res = run_ann(*compiled, "--work-dir", run)
    assert res.returncode == 0, res.stderr[-3000:]
    assert [e["step"] for e in _events(run) if e["event"] == "resume"] == [2]
    _assert_bitwise_equal(_final_weights(run, 4), uninterrupted)

    res = run_ann("eval", "recipes/demo.yaml", "--work-dir", run, *sets)
    assert res.returncode == 0, res.stderr[-3000:]
    out = tmp_path / "model.ts"
    res = run_ann("export", "--checkpoint", run / "checkpoints" / "step-000004", "--format", "torchscript",
                  "--out", out, "--size", "32x64")
    assert res.returncode == 0 and out.is_file(), res.stderr[-3000:]
