"""A refused start or a failed save loses nothing, with real `ann train` processes: a refused `--resume PATH`
moves no checkpoint, a save over the file-size limit says so in one line and leaves no staging folder, and
an older checkpoint that cannot be read does not stop a run whose new checkpoint is complete."""

import os
import shutil
import subprocess

import pytest

from conftest import ROOT, ann_cmd, ann_env, run_ann, run_ann_limited, tiny_overrides


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny run with checkpoints at steps 3 and 6, and its data; each test works on a copy of the run."""
    base = tmp_path_factory.mktemp("trained")
    data, run = base / "data", base / "run"
    res = run_ann("train", "recipes/demo.yaml", "--work-dir", run, *tiny_overrides(data, **{"train.keep_last": 3}))
    assert res.returncode == 0, res.stderr[-3000:]
    return data, run


def _copy(trained, tmp_path):
    data, run = trained
    return data, shutil.copytree(run, tmp_path / "run")


def _steps(run):
    return sorted(p.name for p in (run / "checkpoints").iterdir())


def _one_error_line(res, needle):
    assert res.returncode == 2, res.stderr[-3000:]
    errors = [line for line in res.stderr.splitlines() if line.startswith("ann: error:")]
    assert len(errors) == 1 and needle in errors[0] and "Traceback" not in res.stderr, res.stderr[-3000:]


@pytest.mark.parametrize("change, needle", [({"optim.lr": 0.5}, "breaks exact resume"),
                                            ({"model.key_channels": 16}, "trained with a different model")])
def test_a_refused_resume_from_an_older_checkpoint_moves_nothing(trained, tmp_path, change, needle):
    data, run = _copy(trained, tmp_path)
    recipe_before = (run / "recipe.yaml").read_bytes()
    older = run / "checkpoints" / "step-000003"
    res = run_ann("train", "recipes/demo.yaml", "--work-dir", run, "--resume", older,
                  *tiny_overrides(data, **{"train.keep_last": 3, **change}))
    _one_error_line(res, needle)
    assert _steps(run) == ["step-000003", "step-000006"]
    assert not list(run.glob("superseded-*")) and "moved" not in res.stderr
    assert (run / "recipe.yaml").read_bytes() == recipe_before  # the run's recipe is not the refused one
    res = run_ann("train", "recipes/demo.yaml", "--work-dir", run, *tiny_overrides(data, **{"train.iters": 7}))
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resumed from" in res.stderr and "step-000006 at step 6" in res.stderr  # not back at step 3


def test_init_from_with_resume_path_is_refused_before_anything_starts(trained, tmp_path):
    data, run = trained
    older = run / "checkpoints" / "step-000003"
    res = run_ann("train", "recipes/demo.yaml", "--work-dir", tmp_path / "new", "--resume", older,
                  "--init-from", older, "--dry-run", *tiny_overrides(data))
    _one_error_line(res, f"--init-from loads weights into a new run at step 0; it excludes --resume {older}")
    assert not (tmp_path / "new").exists()


def test_a_save_over_the_file_size_limit_is_one_line_and_leaves_no_staging_folder(trained, tmp_path):
    data, _ = trained
    run = tmp_path / "run"
    res = run_ann_limited("train", "recipes/demo.yaml", "--work-dir", run, *tiny_overrides(data),
                          limit=1 << 20)  # the recipe and the event log fit, model.pt does not
    _one_error_line(res, "file-size limit")
    assert f"{run}: file too large" in res.stderr and "inline_container" not in res.stderr
    assert _steps(run) == []  # neither .tmp-step-000003 nor a step directory without its marker


def test_an_unreadable_older_checkpoint_does_not_stop_the_run_it_belongs_to(trained, tmp_path):
    """A real EACCES: step 3's model.pt is mode 000 and the run has no root's right to read it anyway.
    Pruning checks the checkpoints it keeps (train.keep_last 4): step 3 is warned about once, left, not
    counted, and the run goes on to its end."""
    data, run = _copy(trained, tmp_path)
    unreadable = run / "checkpoints" / "step-000003" / "model.pt"
    os.chmod(unreadable, 0)
    no_override = ["setpriv", "--inh-caps=-dac_override,-dac_read_search",
                   "--bounding-set=-dac_override,-dac_read_search"]
    args = ["train", "recipes/demo.yaml", "--work-dir", run,
            *tiny_overrides(data, **{"train.iters": 12, "train.keep_last": 4})]
    res = subprocess.run(no_override + ann_cmd(*args), capture_output=True, text=True, cwd=ROOT, env=ann_env(),
                         timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    warnings = [line for line in res.stderr.splitlines() if "cannot check or prune the older checkpoint" in line]
    assert len(warnings) == 1 and "Permission denied" in warnings[0], res.stderr[-3000:]
    assert _steps(run) == ["step-000003", "step-000006", "step-000009", "step-000012"]
    assert (run / "checkpoints" / "step-000012" / "COMPLETE").is_file()
