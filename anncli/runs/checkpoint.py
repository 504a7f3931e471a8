"""The run directory and the checkpoint protocol, with one owner: `Checkpointer`.

    runs/<name>/recipe.yaml  events.jsonl  tb/  .lock
    runs/<name>/checkpoints/step-000400/{model.pt, optim.pt or zero.pt, state.json, recipe.yaml,
                                         data.json, COMPLETE}

Nothing in a checkpoint belongs to one rank: the data position is world-free (data/global_stream.py), the
dropout RNG is reseeded every step from (seed, step, rank), and the engines write world-free states, so a
checkpoint resumes on any world size that can split its effective batch (plan.run_split).

A checkpoint is written into a temporary sibling directory, every file is fsynced, the directory is
renamed into place, and the COMPLETE marker, holding every file's SHA-256 (integrity.py), is written last.
Only directories with the marker count, so a process killed during a write leaves the previous checkpoint
in use; one damaged later is skipped by `--resume auto` and refused, in one line, everywhere else.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import NamedTuple

import torch

from anncli.errors import UserError
from anncli.paths import fsync_path, write_text_whole
from anncli.recipe import Recipe, recipe_to_yaml
from anncli.runs import rundir
from anncli.runs.integrity import DamagedCheckpoint, load_torch
from anncli.runs.locks import lock_run_dir
from anncli.runs.retention import reading, remove_staging
from anncli.runs.rundir import checkpoint_path, decide_start, latest_checkpoint, require_checkpoint
from anncli.runs.staging import begin_save, discard_failed_save, finish_save, staging_dir

# Model settings that do not change the weights' meaning, so a checkpoint may be loaded across them.
_MODEL_KEYS_IGNORED = {"norm", "pretrained", "channels_last", "attention", "compile", "compile_backend"}


def default_work_dir(recipe: Recipe) -> Path:
    return Path("runs") / recipe.name


def read_state(path: Path) -> dict:
    try:
        return json.loads((Path(path) / "state.json").read_text())
    except (OSError, ValueError):
        raise DamagedCheckpoint(f"checkpoint {path} is damaged: state.json cannot be read") from None


def checkpoint_recipe(path: Path) -> Path:
    recipe = require_checkpoint(path) / "recipe.yaml"
    if not recipe.is_file():
        raise UserError(f"checkpoint {path}: has no recipe.yaml; pass --recipe")
    return recipe


def _model_signature(model_section: dict) -> dict:
    return {k: v for k, v in model_section.items() if k not in _MODEL_KEYS_IGNORED}


def check_compatible(path: Path, recipe: Recipe) -> None:
    """One line saying what differs when the checkpoint's model is not the recipe's."""
    saved = _model_signature(read_state(path).get("model", {}))
    wanted = _model_signature(recipe.model.model_dump(mode="json"))
    diffs = [f"model.{k}={saved.get(k)!r} (recipe: {wanted.get(k)!r})" for k in wanted if saved.get(k) != wanted.get(k)]
    if diffs:
        raise UserError(f"checkpoint {path} was trained with a different model: " + ", ".join(diffs))


def load_model_for_inference(path: Path, recipe: Recipe) -> dict:
    """The weights of a checkpoint, read under its read lock (a running training's prune keeps it)."""
    with reading(path):
        path = require_checkpoint(path)
        check_compatible(path, recipe)
        return load_torch(path / "model.pt")


# --- writing ---------------------------------------------------------------------------------------


def save_torch(obj, path: Path) -> None:
    torch.save(obj, path)
    fsync_path(path)


def save_json(obj, path: Path) -> None:
    path.write_text(json.dumps(obj, indent=1, sort_keys=True))
    fsync_path(path)


DATA_FILE = "data.json"


def first_non_finite(module: torch.nn.Module) -> str | None:
    """The name of the first parameter or buffer holding inf/NaN, or None: such a state is never saved."""
    named = [(n, t) for n, t in [*module.named_parameters(), *module.named_buffers()] if t.is_floating_point()]
    if not named:
        return None
    finite = torch.stack([torch.isfinite(t.detach()).all() for _, t in named])
    return None if bool(finite.all()) else named[int((~finite).nonzero()[0, 0])][0]  # one host sync


def saved_effective_batch(path: Path) -> int:
    """The effective batch a checkpoint's run trained with (a resumed run keeps it)."""
    state = read_state(path)
    if "imported_from" in state:
        raise UserError(f"checkpoint {path}: imported weights (no optimizer, schedule or data position to resume); "
                        f"start a run from them with --init-from {path}")
    if not state.get("effective_batch"):
        raise UserError(f"checkpoint {path}: its state.json records no effective batch, so it cannot be resumed; "
                        f"start a run from its weights with --init-from {path}")
    return int(state["effective_batch"])


class SavedSplit(NamedTuple):
    """How the run that wrote a checkpoint split its batch, and where its data stream stopped."""
    effective_batch: int
    world_size: int
    batch_size: int  # per rank; 0 when the checkpoint does not say (written by an older ann)
    next_sample: int


def saved_split(path: Path) -> SavedSplit:
    effective_batch = saved_effective_batch(path)  # imported weights and old files: one line saying what to do
    state = read_state(path)
    try:
        position = int(json.loads((Path(path) / DATA_FILE).read_text()).get("next_sample", 0))
    except (OSError, ValueError, AttributeError):
        position = 0  # Checkpointer.load names a missing or damaged data.json
    return SavedSplit(effective_batch, int(state.get("world_size") or 0),
                      int(state.get("batch_size") or 0), position)


class Resumed(NamedTuple):
    """What a checkpoint gives back besides the engine's and the data stream's state."""
    step: int
    bad_steps_total: int
    world_size: int  # of the run that wrote it


class Checkpointer:
    """The owner of a training run's directory: its lock, its layout, saving and loading checkpoints.

    `save` (every rank calls it: it holds barriers) stages a step: the engine writes model.pt and optim.pt
    (DeepSpeed: zero.pt), rank 0 state.json, recipe.yaml and the world-free data-stream position (data.json);
    then rank 0 fsyncs, renames, marks COMPLETE (checksums of every file) and keeps the newest `train.keep_last`.
    `load` checks that a checkpoint fits this run and reads all of it back."""

    def __init__(self, run_dir: Path, recipe: Recipe, info):
        self.run_dir, self.recipe, self.info = Path(run_dir), recipe, info
        self._lock = None
        self._given = None  # rank 0: the checkpoint `--resume PATH` named, superseding newer ones once loaded

    def open(self) -> None:
        """Rank 0 creates and locks the run directory and removes what a failed save left; every rank
        waits for it. The run's recipe.yaml is written once the start is settled (`find`, `load`)."""
        from anncli.cluster.distributed import barrier

        if self.info.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self._lock = lock_run_dir(self.run_dir, float(os.environ.get("ANN_LOCK_TIMEOUT", "300")))
            remove_staging(self.run_dir)
        barrier()  # every rank looks for the checkpoint to resume only once the run directory is ours

    def _write_recipe(self) -> None:
        write_text_whole(self.run_dir / "recipe.yaml", recipe_to_yaml(self.recipe))

    def close(self) -> None:
        if self._lock is not None:
            self._lock.close()

    def find(self, resume: str, fresh: bool = False, init_from: bool = False) -> Path | None:
        """The checkpoint to continue from (None: step 0). Rank 0 decides, checksums included, and every
        rank gets its answer, so that ranks seeing different file-system states never load different
        weights; a refusal reaches every rank as the same one line."""
        from anncli.cluster.distributed import broadcast_object

        answer = None
        if self.info.is_main:
            try:
                found = decide_start(self.run_dir, resume, fresh=fresh, init_from=init_from)
                answer = ("ok", None if found is None else str(found))
                if found is None:
                    self._write_recipe()
                elif resume not in ("auto", "never"):
                    self._given = found
            except UserError as e:
                answer = ("error", str(e))
        kind, value = broadcast_object(answer)
        if kind == "error":
            raise UserError(value)
        return None if value is None else Path(value)

    def latest(self) -> Path | None:
        return latest_checkpoint(self.run_dir)

    def save(self, step: int, engine, stream, bad_steps_total: int = 0) -> Path:
        from anncli.cluster.distributed import any_rank, barrier

        info, recipe = self.info, self.recipe
        bad = first_non_finite(engine.module)
        if any_rank(bad is not None, info.device):  # every rank stops alike; nothing is written
            raise UserError(f"step {step}: the model's {bad or 'weights on another rank'} hold non-finite values; "
                            f"no checkpoint written, the run stops. Last good checkpoint: {self.latest() or 'none'}. "
                            "Lower optim.lr or use train.precision=fp32/bf16")
        tmp = staging_dir(self.run_dir, step)
        if info.is_main:
            begin_save(self.run_dir, step)
        barrier()
        try:
            self._write(tmp, step, engine, stream, bad_steps_total)
        except BaseException:
            if info.is_main:
                discard_failed_save(self.run_dir, step)
            raise
        barrier()
        return checkpoint_path(self.run_dir, step)

    def _write(self, tmp: Path, step: int, engine, stream, bad_steps_total: int) -> None:
        from anncli.cluster.distributed import barrier

        info, recipe = self.info, self.recipe
        engine.save(tmp)
        if info.is_main:
            save_json(stream.state_dict(), tmp / DATA_FILE)
            state = {"step": step, "recipe": recipe.name, "engine": recipe.engine, "world_size": info.world_size,
                     "model": recipe.model.model_dump(mode="json"), "bad_steps_total": bad_steps_total,
                     "effective_batch": stream.effective_batch, "batch_size": stream.batch_size}
            save_json(state, tmp / "state.json")
            (tmp / "recipe.yaml").write_text(recipe_to_yaml(recipe))
        barrier()
        if info.is_main:
            finish_save(self.run_dir, step, recipe.train.keep_last)

    def load(self, path: Path, engine, stream, allow_recipe_change: bool = False) -> Resumed:
        """Check that `path` fits this run, read it into the engine and the stream, and only then, once
        every rank has, settle the run directory: checkpoints newer than a `--resume PATH` move aside."""
        from anncli.cluster.distributed import barrier

        recipe, info = self.recipe, self.info
        check_compatible(path, recipe)
        state = read_state(path)
        if state.get("engine", recipe.engine) != recipe.engine:
            raise UserError(f"checkpoint {path} was written by engine {state['engine']}, the recipe uses {recipe.engine}")
        if state.get("effective_batch") != stream.effective_batch:
            raise UserError(f"checkpoint {path} trained with effective batch {state.get('effective_batch')}, this "
                            f"run splits {stream.effective_batch}; a resumed run must keep it")
        if not (path / DATA_FILE).is_file():
            raise UserError(f"checkpoint {path}: has no world-free data position {DATA_FILE} (written by an older ann)")
        if (Path(path) / "recipe.yaml").is_file():
            rundir.check_recipe_change(path, (Path(path) / "recipe.yaml").read_text(), recipe_to_yaml(recipe),
                                       allow=allow_recipe_change, announce=info.is_main)
        engine.load(path)
        stream.load_state_dict(_read_data_position(path))
        barrier()  # a rank that refused stops every rank (rank_session) before anything is moved
        if info.is_main:
            if self._given is not None:
                rundir.supersede_newer(self.run_dir, self._given)
            self._write_recipe()
        return Resumed(step=state["step"], bad_steps_total=state.get("bad_steps_total", 0),
                       world_size=state["world_size"])


def _read_data_position(path: Path) -> dict:
    try:
        return json.loads((Path(path) / DATA_FILE).read_text())
    except (OSError, ValueError):
        raise DamagedCheckpoint(f"checkpoint {path} is damaged: {DATA_FILE} cannot be read") from None


def interrupted_note(run_dir: Path) -> str:
    """What a user stopped with Ctrl-C is told about the run: where `--resume auto` will continue."""
    last = latest_checkpoint(run_dir)
    return (f"last complete checkpoint: {last} (--resume auto continues from it)" if last else
            f"no complete checkpoint in {run_dir} yet")
