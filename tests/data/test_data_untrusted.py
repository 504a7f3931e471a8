"""A recipe that comes from a checkpoint is data, not a program: `ann eval --checkpoint DIR` without a recipe
never runs a `pipe:` command or opens a URL that the checkpoint's recipe.yaml names (anyone who can write a
shared run directory could plant one, and the COMPLETE marker is a checksum, not a signature); the user's
own recipe or `--split` may. A local folder named like a command is read as a folder."""

import shutil

import pytest
import yaml

from anncli.data.manifest import resolve_urls
from anncli.data.shards import eval_samples
from test_eval_choose import _cli
from test_eval_run import write_checkpoint, write_recipe, write_split


@pytest.mark.parametrize("planted", ["pipe:touch {pwned}; cat /dev/null", "http://127.0.0.1:9/x-{{0..1}}.tar"])
def test_a_checkpoints_recipe_never_runs_a_pipe_or_opens_a_url(tmp_path, planted):
    pwned = tmp_path / "PWNED"
    spec = planted.format(pwned=pwned)
    write_split(tmp_path / "data", "val", [2])
    recipe = write_recipe(tmp_path / "recipe.yaml", tmp_path / "data")
    tree = yaml.safe_load(recipe.read_text())
    tree["data"]["val"] = spec
    recipe.write_text(yaml.safe_dump(tree))
    checkpoint = write_checkpoint(tmp_path / "run", recipe)  # complete and verified: the marker matches
    res = _cli("eval", "--checkpoint", checkpoint)
    assert res.exit_code == 2, res.output[-2000:]
    assert "a recipe that comes from a checkpoint never runs pipe: commands or opens URLs" in res.output
    assert f"data.val of {checkpoint / 'recipe.yaml'} reads {spec.split('::')[0]!r}" in res.output
    assert "Traceback" not in res.output and not pwned.exists()
    # The user's own --split may say the same kind of thing: it runs.
    ran = tmp_path / "RAN"
    res = _cli("eval", "--checkpoint", checkpoint, "--split",
               f"pipe:touch {ran}; cat {tmp_path / 'data' / 'synth-val-000000.tar'}")
    assert res.exit_code == 0, res.output[-2000:]
    assert ran.exists() and not pwned.exists()


def test_a_local_folder_named_like_a_command_is_read_as_a_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    root = "pipe:touch PWNED;cat "  # a legal folder name; joined with a shard name it reads like a command
    write_split(tmp_path / "data", "val", [2])
    shutil.copytree(tmp_path / "data", tmp_path / root)
    for spec in ("val", "synth-val-000000.tar", "synth-val-*.tar", "synth-val.json"):
        urls = resolve_urls(root, "synth", spec)
        assert len(list(eval_samples(urls, rank=0, world_size=1))) == 2, spec
    assert not (tmp_path / "PWNED").exists()
