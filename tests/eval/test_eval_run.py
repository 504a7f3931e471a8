"""`ann eval` end to end on tiny real shards and a real checkpoint: single process, 2 gloo ranks, errors."""

import json
import uuid
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import webdataset as wds
import yaml
from torch.distributed.launcher.api import LaunchConfig, elastic_launch
from typer.testing import CliRunner

from anncli.errors import UserError
from anncli.eval.evaluate import EvalOptions, run_evaluation
from anncli.runs.choose import choose_run
from anncli.recipe import load_recipe

CLASSES = ["bg", "red", "green", "blue", "grey"]
SHARD_SIZES = [2, 2, 2, 1]  # 7 samples: rank 0 reads shards 0 and 2 (4), rank 1 shards 1 and 3 (3)


def _png(array: np.ndarray) -> bytes:
    ok, data = cv2.imencode(".png", array)
    assert ok
    return data.tobytes()


def write_split(root: Path, split: str, sizes, corrupt_key: str | None = None) -> list[str]:
    """Shards `synth-<split>-00000N.tar` and their manifest, written with webdataset's TarWriter."""
    rng = np.random.default_rng(len(split))
    root.mkdir(parents=True, exist_ok=True)
    shards, keys = [], []
    for s, count in enumerate(sizes):
        name = f"synth-{split}-{s:06d}.tar"
        with wds.TarWriter(str(root / name)) as sink:
            for i in range(count):
                key = f"{split}_{s}_{i}"
                h, w = 24 + 8 * (i % 2), 32
                image = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
                label = rng.integers(0, len(CLASSES), size=(h, w), dtype=np.uint8)
                label[:2] = 255
                seg = b"not a png" if key == corrupt_key else _png(label)
                sink.write({"__key__": key, "img.png": _png(image[..., ::-1]), "seg.png": seg})
                keys.append(key)
        shards.append({"name": name, "count": count})
    manifest = {"dataset": "synth", "split": split, "classes": CLASSES, "ignore_index": 255,
                "palette": [[0, 0, 0]] * len(CLASSES), "shards": shards, "total": sum(sizes)}
    (root / f"synth-{split}.json").write_text(json.dumps(manifest))
    return keys


def write_recipe(path: Path, data_root: Path, **model) -> Path:
    recipe = {
        "name": "evaltest",
        "model": {"name": "ann", "backbone": "small", "num_classes": len(CLASSES), "norm": "bn", "aux": False,
                  "key_channels": 8, "value_channels": 8, "psp_sizes": [1, 2], **model},
        "data": {"dataset": "synth", "root": str(data_root), "train": "val", "val": "val", "num_workers": 0},
        "eval": {"scales": [0.75, 1.0], "flip": True, "mode": "whole"},
    }
    path.write_text(yaml.safe_dump(recipe))
    return path


def write_checkpoint(run_dir: Path, recipe_path: Path, step: int = 10) -> Path:
    from anncli.runs.checkpoint import save_json, save_torch
    from anncli.runs.staging import begin_save, finish_save
    from anncli.models.ann import build_model

    recipe = load_recipe(recipe_path)
    torch.manual_seed(0)
    model = build_model(recipe.model).eval()
    features = []
    hook = model.classifier.register_forward_hook(lambda mod, args, out: features.append(args[0]))
    with torch.no_grad():  # centre the logits, so that the predicted class varies from pixel to pixel
        model(torch.randn(4, 3, 24, 32))
        hook.remove()
        mean = features[0].mean(dim=(0, 2, 3))
        model.classifier.bias.copy_(-(model.classifier.weight[:, :, 0, 0] @ mean))
    tmp = begin_save(run_dir, step)
    save_torch(model.state_dict(), tmp / "model.pt")
    save_json({"step": step, "model": recipe.model.model_dump(mode="json")}, tmp / "state.json")
    (tmp / "recipe.yaml").write_text(recipe_path.read_text())
    return finish_save(run_dir, step, keep_last=3)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    torch.set_num_threads(1)
    base = tmp_path_factory.mktemp("evalrun")
    keys = write_split(base / "data", "val", SHARD_SIZES)
    write_split(base / "data", "empty", [0])
    write_split(base / "data", "bad", SHARD_SIZES, corrupt_key="bad_3_0")
    recipe_path = write_recipe(base / "recipe.yaml", base / "data")
    checkpoint = write_checkpoint(base / "run", recipe_path)
    return {"base": base, "keys": keys, "recipe": recipe_path, "checkpoint": checkpoint}


def _expected_names() -> list[str]:
    try:
        from anncli.data.datasets import class_names
    except ImportError:
        return CLASSES
    return list(class_names("synth"))


def _options(setup, **cli) -> EvalOptions:
    args = dict(recipe_path=str(setup["recipe"]), checkpoint=setup["checkpoint"], multiscale=False, scales=None,
                flip=None, mode=None, crop=None, stride=None, merge=None, split="val", json_out=None,
                save_pred=None)
    args.update(cli)
    return EvalOptions.from_cli(load_recipe(setup["recipe"]), **args)


def _counts(report: dict) -> list[tuple[int, int, int]]:
    return [(c["intersection"], c["pixels"], c["predicted"]) for c in report["per_class"]]


def test_single_process_report_json_and_predictions(setup, tmp_path):
    opts = _options(setup, multiscale=True, json_out=tmp_path / "m.json", save_pred=tmp_path / "pred")
    report = run_evaluation(load_recipe(setup["recipe"]), opts)
    assert report["samples"] == 7
    assert sum(c["pixels"] for c in report["per_class"]) == report["pixels"] == 4 * 24 * 32 + 3 * 32 * 32 - 7 * 2 * 32
    saved = json.loads((tmp_path / "m.json").read_text())
    assert saved["protocol"]["scales"] == [0.75, 1.0] and saved["protocol"]["flip"] is True
    assert {"mode", "crop", "stride", "merge"} <= saved["protocol"].keys()
    assert saved["checkpoint"] == str(setup["checkpoint"]) and saved["samples"] == 7
    assert [c["name"] for c in saved["per_class"]] == _expected_names()
    assert sum(c["predicted"] > 0 for c in report["per_class"]) >= 3  # a model that predicts several classes
    assert saved["mIoU"] == pytest.approx(report["mIoU"])
    preds = sorted(p.stem for p in (tmp_path / "pred").glob("*.png"))
    assert preds == sorted(setup["keys"])
    label = cv2.imread(str(tmp_path / "pred" / "val_0_1.png"), cv2.IMREAD_UNCHANGED)
    assert label.shape == (32, 32) and label.dtype == np.uint8 and label.max() < len(CLASSES)


def test_default_checkpoint_is_the_newest_complete_one(setup):
    chosen = choose_run(setup["recipe"], None, setup["base"] / "run")
    assert chosen.checkpoint == setup["checkpoint"]
    opts = _options(setup, checkpoint=chosen.checkpoint)
    assert run_evaluation(load_recipe(setup["recipe"]), opts)["checkpoint"] == str(setup["checkpoint"])


def test_cli_takes_the_newest_checkpoint_of_the_work_dir_and_names_the_json_after_it(setup, tmp_path):
    result = _cli("eval", setup["recipe"], "--work-dir", setup["base"] / "run", "--json",
                  tmp_path / "eval-{checkpoint}-ms.json")
    assert result.exit_code == 0, result.output
    saved = json.loads((tmp_path / f"eval-{setup['checkpoint'].name}-ms.json").read_text())
    assert saved["checkpoint"] == str(setup["checkpoint"]) and saved["samples"] == len(setup["keys"])


def test_cli_without_a_complete_checkpoint_stops_before_starting_anything(setup, tmp_path):
    result = _cli("eval", setup["recipe"], "--work-dir", tmp_path / "norun", "--nproc-per-node", "2")
    assert result.exit_code == 2 and "no complete checkpoint under" in result.output, result.output
    partial = tmp_path / "run" / "checkpoints" / "step-000001"
    partial.mkdir(parents=True)
    result = _cli("eval", setup["recipe"], "--checkpoint", partial, "--nproc-per-node", "2")
    assert result.exit_code == 2 and "incomplete" in result.output, result.output


def test_corrupt_sample_is_an_error_naming_shard_and_key(setup):
    with pytest.raises(UserError, match=r"synth-bad-000003\.tar: sample bad_3_0"):
        run_evaluation(load_recipe(setup["recipe"]), _options(setup, split="bad"))


def _rank_worker(recipe_path: str, checkpoint: str, split: str):
    torch.set_num_threads(1)
    opts = EvalOptions.from_cli(load_recipe(recipe_path), recipe_path=recipe_path, checkpoint=Path(checkpoint),
                                multiscale=True, scales=None, flip=None, mode=None, crop=None, stride=None,
                                merge=None, split=split, json_out=None, save_pred=None)
    try:
        return run_evaluation(load_recipe(recipe_path), opts)
    except UserError as e:
        return f"UserError: {e}"


def _launch(setup, split: str) -> dict:
    cfg = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=2, run_id=str(uuid.uuid4()), rdzv_backend="c10d",
                       rdzv_endpoint="localhost:0", max_restarts=0, monitor_interval=0.1)
    return elastic_launch(cfg, entrypoint=_rank_worker)(str(setup["recipe"]), str(setup["checkpoint"]), split)


def test_two_gloo_ranks_over_uneven_shards_equal_one_process(setup):
    one = run_evaluation(load_recipe(setup["recipe"]), _options(setup, multiscale=True))
    ranks = _launch(setup, "val")  # 7 samples over 4 shards: rank 0 reads 4, rank 1 reads 3
    for r in (0, 1):
        report = ranks[r]
        assert report["world_size"] == 2 and report["samples"] == 7
        assert _counts(report) == _counts(one)
        assert (report["aAcc"], report["mIoU"], report["mAcc"]) == (one["aAcc"], one["mIoU"], one["mAcc"])


def test_corrupt_sample_on_one_rank_fails_every_rank_without_hanging(setup):
    ranks = _launch(setup, "bad")  # shard 3 belongs to rank 1
    assert "synth-bad-000003.tar: sample bad_3_0" in ranks[1]
    assert ranks[0].startswith("UserError: evaluation failed on 1 other rank")


def _cli(*args):
    from anncli.cli.main import app

    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.mark.parametrize("args, message", [
    (["--scales", "0,1"], "every scale must be > 0"),
    (["--scales", "1,x"], "comma-separated numbers"),
    (["--mode", "slide", "--crop", "16x16", "--stride", "20x8"], "larger than the crop"),
    (["--mode", "slide", "--crop", "16by16", "--stride", "8x8"], "--crop '16by16'"),
    (["--mode", "slide"], "slide mode needs a window"),
    (["--merge", "max"], "--merge 'max'"),
    (["--split", "empty"], "no samples"),
    (["--set", "model.num_classes=4"], "num_classes"),
])
def test_bad_input_exits_2_with_one_line(setup, args, message):
    result = _cli("eval", setup["recipe"], "--checkpoint", setup["checkpoint"], *args)
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert "Traceback" not in result.output
    assert lines[-1].startswith("ann: error: ") and message in lines[-1]


def test_missing_synthetic_set_is_created_and_validate_matches(tmp_path):
    from anncli.cluster.distributed import DistInfo
    from anncli.eval.evaluate import validate
    from anncli.eval.inference import load_model

    recipe_path = write_recipe(tmp_path / "synth.yaml", tmp_path / "synth")
    tree = yaml.safe_load(recipe_path.read_text())
    tree["data"]["synth"] = {"train": 2, "val": 3, "size": [32, 48], "seed": 1}
    recipe_path.write_text(yaml.safe_dump(tree))
    checkpoint = write_checkpoint(tmp_path / "run", recipe_path)
    recipe = load_recipe(recipe_path)
    opts = EvalOptions.from_cli(recipe, recipe_path=str(recipe_path), checkpoint=checkpoint, multiscale=False,
                                scales=None, flip=None, mode=None, crop=None, stride=None, merge=None, split="val",
                                json_out=None, save_pred=None)
    report = run_evaluation(recipe, opts)
    assert report["samples"] == 3 and (tmp_path / "synth" / "synth-val.json").is_file()
    info = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    metrics = validate(load_model(recipe, checkpoint, info.device).train(), recipe, info)
    assert metrics["samples"] == 3 and _counts(metrics) == _counts(report)


_DAMAGE = {
    "random bytes": lambda f: f.write_bytes(np.random.default_rng(0).bytes(f.stat().st_size)),
    "truncated": lambda f: f.write_bytes(f.read_bytes()[: f.stat().st_size // 2]),
    "empty": lambda f: f.write_bytes(b""),
    "missing": lambda f: f.unlink(),
}


@pytest.mark.parametrize("damage", _DAMAGE)
def test_damaged_checkpoint_is_one_line_for_eval_and_predict(setup, tmp_path, damage):
    import shutil

    run = tmp_path / "run"
    checkpoint = run / "checkpoints" / setup["checkpoint"].name
    shutil.copytree(setup["checkpoint"], checkpoint)
    _DAMAGE[damage](checkpoint / "model.pt")
    image = tmp_path / "x.png"
    cv2.imwrite(str(image), np.zeros((24, 32, 3), np.uint8))
    for args in (["eval", setup["recipe"], "--checkpoint", checkpoint],
                 ["eval", setup["recipe"], "--work-dir", run],
                 ["predict", image, "--checkpoint", checkpoint, "--out", tmp_path / "out"]):
        result = _cli(*args)
        assert result.exit_code == 2, result.output
        assert "Traceback" not in result.output and "weights_only" not in result.output
        last = result.output.strip().splitlines()[-1]
        assert last.startswith("ann: error: ") and f"checkpoint {checkpoint} is damaged: model.pt" in last


def test_evaluation_with_data_workers_leaves_the_global_rng_alone(setup):
    """In-training validation runs between a checkpoint and the next step: drawing from the global RNG
    there would make a resumed run (which does not repeat that validation) diverge."""
    from anncli.data.manifest import resolve_urls
    from anncli.data.shards import eval_samples

    urls = resolve_urls(str(setup["base"] / "data"), "synth", "val")
    torch.manual_seed(3)
    before = torch.get_rng_state()
    assert len(list(eval_samples(urls, rank=0, world_size=1, num_workers=2))) == 7
    assert torch.equal(torch.get_rng_state(), before)
