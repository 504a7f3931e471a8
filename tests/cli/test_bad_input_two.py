"""Bad input, round two: inputs that were silently accepted, misread, or ended in a traceback or a misleading
line. Each is now one line naming what was found and what to do, exit code 2 (1 where work was done)."""

import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT, ann_cmd, ann_env
from test_eval_choose import _cli  # the CLI in-process (typer's CliRunner)
from test_eval_run import write_checkpoint, write_recipe, write_split
from test_weights import peer_file

OFFICIAL = ROOT / "tests" / "fixtures" / "official-ann-r50.pt"


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    torch.set_num_threads(1)
    base = tmp_path_factory.mktemp("badinput")
    write_split(base / "data", "val", [3])
    recipe = write_recipe(base / "recipe.yaml", base / "data")
    checkpoint = write_checkpoint(base / "run", recipe)
    return base, recipe, checkpoint


def _one_line(res, code: int, needle: str) -> None:
    out = res.output.strip()
    assert res.exit_code == code, (res.exit_code, out[-2000:], res.exception)
    assert needle in out, out[-2000:]
    assert "Traceback" not in out and len([line for line in out.splitlines() if "error" in line]) == 1, out[-2000:]


# ---------------------------------------------------------------- silently accepted (item 20) and tracebacks (19)


@pytest.mark.parametrize("args, needle", [
    (["--scales", "1,,2"], "--scales '1,,2': an empty item"),
    (["--scales", "1e9"], "at most 4"),
    (["--crop", "16x16"], "--crop sets the sliding window, which whole mode does not use"),
])
def test_eval_options_that_mean_nothing_or_too_much_are_refused(project, args, needle):
    _, recipe, checkpoint = project
    _one_line(_cli("eval", recipe, "--checkpoint", checkpoint, *args), 2, needle)


@pytest.mark.parametrize("override, needle", [
    ("train={iters: 5}", "would replace the whole section"),
    ("train.iters=true", "train.iters: expected a number, got true"),
    ("train.batch_size=1000000000", "train.batch_size: Input should be less than or equal to 1024"),
    ("eval.scales=[1000000000]", "eval.scales: every scale must be > 0 and at most 4"),
])
def test_recipe_values_that_were_misread_are_refused(override, needle):
    _one_line(_cli("train", "recipes/demo.yaml", "--set", override, "--dry-run"), 2, needle)


def test_init_skip_needs_init_from():
    _one_line(_cli("train", "recipes/demo.yaml", "--init-skip", "classifier", "--dry-run"), 2,
              "--init-skip classifier leaves tensors out of --init-from, which is not given")


def test_synth_refuses_a_size_that_cannot_fit(tmp_path):
    _one_line(_cli("data", "synth", tmp_path / "s", "--size", "100000x100000"), 2, "at most 4096 pixels a side")
    assert not (tmp_path / "s").exists()


def test_inspect_of_an_empty_tar_is_a_problem(tmp_path):
    empty = tmp_path / "empty-val-000000.tar"
    tarfile.open(empty, "w").close()
    res = _cli("data", "inspect", empty)
    assert res.exit_code == 1 and "no samples" in res.output and "labels ok" not in res.output, res.output


def test_export_names_and_folders_are_checked_first(project, tmp_path):
    _, _, checkpoint = project
    _one_line(_cli("export", "--checkpoint", checkpoint, "--out", tmp_path / "x.pt"), 2,
              "a torchscript file name, but --format is onnx")
    _one_line(_cli("export", "--checkpoint", checkpoint, "--format", "torchscript", "--out", tmp_path / "x.onnx"), 2,
              "a onnx file name, but --format is torchscript")
    _one_line(_cli("export", "--checkpoint", checkpoint, "--out", tmp_path / "new" / "x.onnx"), 2,
              f"directory {tmp_path / 'new'} does not exist")
    assert not (tmp_path / "new").exists() and not (tmp_path / "x.pt").exists()


def test_pictures_check_their_format_before_the_model_runs(project, tmp_path):
    _, _, checkpoint = project
    image = tmp_path / "in.png"
    Image.fromarray(np.zeros((24, 32, 3), np.uint8)).save(image)
    _one_line(_cli("viz", "attention", image, "--checkpoint", checkpoint, "--pixel", "4,4", "--out",
                   tmp_path / "v.xyz"), 2, "--out " + str(tmp_path / "v.xyz") + ": .xyz is not a picture format")


def test_a_recipe_path_that_is_a_directory_says_so(tmp_path):
    folder = tmp_path / "recipes"
    folder.mkdir()
    _one_line(_cli("train", folder, "--dry-run"), 2, f"{folder}: is a directory, not a recipe file")
    _one_line(_cli("recipe", "validate", folder), 2, f"{folder}: is a directory, not a recipe file")
    res = subprocess.run(ann_cmd("train", "recipes", "--dry-run"), capture_output=True, text=True, cwd=tmp_path,
                         env=ann_env(), timeout=300)  # a bare name beside a folder of that name
    assert res.returncode == 2 and "recipe recipes: is a directory, not a recipe file" in res.stderr, res.stderr
    assert "no such file" not in res.stderr


def test_plot_of_a_non_utf8_events_file_is_one_line(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "events.jsonl").write_bytes(b'{"event": "step", "step": 1, "loss": 1.0}\n{"event": "\xff\xfe"}\n')
    _one_line(_cli("plot", run, "--out", tmp_path / "c.png"), 2, "events.jsonl:2: not UTF-8 text")


def test_an_unreadable_model_file_is_one_line(project, tmp_path):
    """A real permission error: model.pt is mode 000 and the command runs without root's right to read anyway."""
    _, recipe, checkpoint = project
    ckpt = shutil.copytree(checkpoint, tmp_path / "run" / "checkpoints" / checkpoint.name)
    os.chmod(ckpt / "model.pt", 0)
    no_override = ["setpriv", "--inh-caps=-dac_override,-dac_read_search",
                   "--bounding-set=-dac_override,-dac_read_search"]
    res = subprocess.run(no_override + ann_cmd("eval", recipe, "--checkpoint", ckpt), capture_output=True, text=True,
                         cwd=ROOT, env=ann_env(), timeout=300)
    assert res.returncode == 2 and "cannot read model.pt (Permission denied)" in res.stderr, res.stderr[-3000:]
    assert "Traceback" not in res.stderr


# ---------------------------------------------------------------- misleading one-liners (item 22)


def test_a_run_directory_or_a_model_file_as_checkpoint_says_what_it_is(project):
    base, recipe, checkpoint = project
    _one_line(_cli("eval", recipe, "--checkpoint", base / "run"), 2,
              f"is a run directory; give one of its checkpoints (its newest complete one: {checkpoint})")
    _one_line(_cli("eval", recipe, "--checkpoint", checkpoint / "model.pt"), 2,
              f"is a file; a checkpoint is its directory, e.g. {checkpoint}")


def test_a_relative_split_says_where_it_was_looked_up(project):
    base, recipe, checkpoint = project
    _one_line(_cli("eval", recipe, "--checkpoint", checkpoint, "--split", "nowhere-*.tar"), 2,
              f"(relative names are looked up under data.root {base / 'data'})")


def test_weights_commands_say_what_they_were_given(project, tmp_path):
    _, _, checkpoint = project
    _one_line(_cli("weights", "inspect", checkpoint), 2, "an ann checkpoint directory; its weights are ready to use")
    existing = tmp_path / "file"
    existing.write_text("x")
    _one_line(_cli("weights", "import", "official", OFFICIAL, "--out", existing), 2,
              f"--out {existing}: is a file; give the name of a new directory")
    assert existing.read_text() == "x"


def test_resuming_imported_weights_points_to_init_from(tmp_path):
    imported = tmp_path / "imported"
    res = _cli("weights", "import", "official", peer_file("official", tmp_path / "o.pth"), "--out", imported)
    assert res.exit_code == 0, res.output[-2000:]
    _one_line(_cli("train", "recipes/demo.yaml", "--resume", imported, "--work-dir", tmp_path / "run", "--dry-run"),
              2, f"imported weights (no optimizer, schedule or data position to resume); start a run from them "
                 f"with --init-from {imported}")


# ---------------------------------------------------------------- ONNX files and images (items 13, 21)


onnx = pytest.importorskip("onnx")


@pytest.fixture(scope="module")
def exported(project, tmp_path_factory):
    _, _, checkpoint = project
    out = tmp_path_factory.mktemp("onnx") / "m.onnx"
    res = _cli("export", "--checkpoint", checkpoint, "--out", out, "--size", "24x32")
    assert res.exit_code == 0, res.output[-2000:]
    return out


@pytest.mark.parametrize("meta", ["{not json", '{"palette": []}', '{"palette": [[1, 2]]}', "[1, 2]",
                                  '{"classes": ["a"]}'])
def test_malformed_onnx_metadata_is_one_line(exported, tmp_path, meta):
    model = onnx.load(str(exported))
    for prop in model.metadata_props:
        if prop.key == "anncli":
            prop.value = meta
    bad = tmp_path / "bad.onnx"
    onnx.save(model, str(bad))
    image = tmp_path / "in" / "a.png"
    image.parent.mkdir()
    Image.fromarray(np.zeros((24, 32, 3), np.uint8)).save(image)
    _one_line(_cli("predict", image.parent, "--model", bad, "--out", tmp_path / "o"), 2,
              "its anncli metadata is malformed")


def test_onnx_predict_skips_a_bad_image_like_the_torch_path(exported, tmp_path):
    images = tmp_path / "in"
    images.mkdir()
    Image.fromarray(np.zeros((24, 32, 3), np.uint8)).save(images / "good.png")
    (images / "bad.png").write_bytes(b"not a png")
    res = _cli("predict", images, "--model", exported, "--out", tmp_path / "o")
    assert res.exit_code == 1, res.output[-2000:]
    assert "skipped" in res.output and "bad.png" in res.output and "1 of 2 image(s) segmented" in res.output
    assert (tmp_path / "o" / "good_pred.png").is_file() and not (tmp_path / "o" / "bad_pred.png").exists()
