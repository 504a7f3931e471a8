"""Experiment trackers: Weights & Biases and MLflow, logged to by rank 0 beside events.jsonl.

The recipe's `logging.wandb` / `logging.mlflow` turn them on. A run directory has one tracker run per
tracker; its id is kept in <run>/trackers.json, so a resumed launch (a requeue, `--resume`) continues it.
What is logged: the flattened recipe as parameters (when the tracker run is created), every logged
training step and validation pass with its step (the values of events.jsonl), each validation's metrics
JSON (the format of `ann eval --json`), and at the end the training curves and per-class IoU bars drawn
by `ann plot`.

Steps after a resume: a launch that resumes from a checkpoint older than the last logged step computes
steps that were logged already (the same values: resume is exact). Those are skipped, never logged twice:
each tracker's last logged step is kept in trackers.json, and a launch logs only the steps after it.

A tracker that is not installed, unreachable or failing costs one warning line and is left out for the
rest of the launch; training never stops for it.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from pathlib import Path

from anncli.recipe import Recipe
from anncli.runs.rundir import TRACKERS_FILE


def flatten(tree: dict, prefix: str = "") -> dict[str, object]:
    """{"train": {"iters": 10}} -> {"train.iters": 10}; lists and None stay values."""
    flat: dict[str, object] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


class WandbTracker:
    name = "wandb"

    def __init__(self, recipe: Recipe, run_dir: Path, saved: dict):
        import wandb

        cfg = recipe.logging.wandb
        self.run = wandb.init(project=cfg.project, entity=cfg.entity, name=cfg.name or recipe.name, mode=cfg.mode,
                              dir=str(run_dir), id=saved.get("id"), resume="allow",
                              settings=wandb.Settings(console="off"))
        self.run_dir = run_dir
        if not saved.get("id"):
            self.run.config.update(flatten(recipe.model_dump(mode="json")))
        self.state = {"id": self.run.id}

    def scalars(self, step: int, values: dict) -> None:
        self.run.log(values, step=step)

    def artifact(self, path: Path) -> None:
        self.run.save(str(path), base_path=str(self.run_dir), policy="now")

    def close(self, status: str) -> None:
        self.run.finish(exit_code=0 if status == "FINISHED" else 1)


class MlflowTracker:
    name = "mlflow"

    def __init__(self, recipe: Recipe, run_dir: Path, saved: dict):
        import mlflow

        # An unreachable server: a few quick retries, not mlflow's minutes of back-off (unless the user set them).
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
        cfg = recipe.logging.mlflow
        self.client = mlflow.MlflowClient(tracking_uri=cfg.tracking_uri)
        self.uri = mlflow.get_tracking_uri() if cfg.tracking_uri is None else cfg.tracking_uri
        self.entities, self.run_dir = mlflow.entities, run_dir
        if saved.get("run_id") and saved.get("tracking_uri") == self.uri:
            self.run_id = saved["run_id"]
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            self.run_id = self._create(recipe, cfg)
        self.state = {"run_id": self.run_id, "tracking_uri": self.uri}

    def _create(self, recipe: Recipe, cfg) -> str:
        name = cfg.experiment or recipe.name
        experiment = self.client.get_experiment_by_name(name)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(name)
        run_id = self.client.create_run(experiment_id, run_name=cfg.run_name or recipe.name).info.run_id
        params = [self.entities.Param(k, json.dumps(v) if isinstance(v, (list, dict)) else str(v))
                  for k, v in flatten(recipe.model_dump(mode="json")).items()]
        for i in range(0, len(params), 100):  # mlflow takes at most 100 parameters per batch
            self.client.log_batch(run_id, params=params[i : i + 100])
        return run_id

    def scalars(self, step: int, values: dict) -> None:
        now = int(time.time() * 1000)
        metrics = [self.entities.Metric(_mlflow_key(k), float(v), now, step) for k, v in values.items()]
        for i in range(0, len(metrics), 1000):
            self.client.log_batch(self.run_id, metrics=metrics[i : i + 1000])

    def artifact(self, path: Path) -> None:
        folder = path.parent.relative_to(self.run_dir).as_posix()  # val/step-000004.json stays under val/
        self.client.log_artifact(self.run_id, str(path), artifact_path=None if folder == "." else folder)

    def close(self, status: str) -> None:
        self.client.set_terminated(self.run_id, status=status)


def _mlflow_key(key: str) -> str:
    """MLflow keys take letters, digits and _ - . space /; a class name with others gets _ instead."""
    return re.sub(r"[^\w\-. /]", "_", key)


def _why(e: Exception, extra: str) -> str:
    """An exception as a few words on one line."""
    if isinstance(e, ImportError):
        return f"not installed (pip install 'anncli[{extra}]')"
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:300]}"


TRACKERS = {"wandb": WandbTracker, "mlflow": MlflowTracker}


class Trackers:
    """The trackers of one launch (none on ranks other than 0); every call is safe to make."""

    def __init__(self, recipe: Recipe, run_dir: Path, enabled: bool):
        self.run_dir, self.path = Path(run_dir), Path(run_dir) / TRACKERS_FILE
        self.live: list = []
        self.state = self._read() if enabled else {}
        self.floor = {name: int(s.get("last_step", 0)) for name, s in self.state.items()}
        self.last_val: Path | None = None
        for name, cls in TRACKERS.items():
            if enabled and getattr(recipe.logging, name) is not None:
                tracker = self._guard(name, lambda: cls(recipe, self.run_dir, self.state.get(name, {})))
                if tracker is not None:
                    self.live.append(tracker)
                    self.state[name] = {**self.state.get(name, {}), **tracker.state}
        if self.live:
            self._write()

    def _read(self) -> dict:
        try:
            state = json.loads(self.path.read_text())
            return state if isinstance(state, dict) else {}
        except (OSError, ValueError):
            return {}

    def _write(self) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.state, indent=2) + "\n")
        os.replace(tmp, self.path)

    def _guard(self, name: str, call):
        """call(); a failure is one warning line and leaves the tracker out."""
        try:
            return call()
        except Exception as e:  # noqa: BLE001 — a tracker never stops training
            print(f"[ann] warning: {name}: {_why(e, name)}; not logging to {name} for the rest of this launch",
                  file=sys.stderr, flush=True)
            self.live = [t for t in self.live if t.name != name]
            return None

    def _each(self, step: int, what) -> None:
        """what(tracker) for every tracker that has not logged `step` in an earlier launch."""
        for tracker in list(self.live):
            if step > self.floor.get(tracker.name, 0):
                self._guard(tracker.name, lambda: what(tracker))

    def scalars(self, step: int, values: dict) -> None:
        if not self.live:
            return
        self._each(step, lambda t: t.scalars(step, values))
        for tracker in self.live:
            self.state[tracker.name]["last_step"] = max(step, int(self.state[tracker.name].get("last_step", 0)))
        self._write()

    def validation(self, step: int, report: dict) -> None:
        """One validation pass's metrics JSON (`ann eval --json`'s format, drawn by `ann plot`), as an artifact."""
        if not self.live:
            return
        from anncli.eval.metrics import json_safe

        path = self.run_dir / "val" / f"step-{step:06d}.json"
        path.parent.mkdir(exist_ok=True)
        path.write_text(json.dumps(json_safe(report), indent=2) + "\n")
        self.last_val = path
        self._each(step, lambda t: t.artifact(path))

    def finish(self, step: int) -> None:
        """At the last step: the training curves and the last validation's per-class bars, as artifacts."""
        if not self.live:
            return
        from anncli.interop.plot import plot_classes, plot_curves

        pictures = [(plot_curves, [self.run_dir], self.run_dir / "curves.png")]
        if self.last_val is not None:
            pictures.append((plot_classes, [self.last_val], self.run_dir / "classes.png"))
        for draw, inputs, out in pictures:
            try:
                draw(inputs, out)
            except Exception as e:  # noqa: BLE001 — e.g. matplotlib missing: the trackers go without the picture
                print(f"[ann] warning: {out.name} for the trackers: {_why(e, 'plot')}", file=sys.stderr, flush=True)
                continue
            self._each(step, lambda t: t.artifact(out))

    def close(self, status: str) -> None:
        """status: FINISHED, KILLED (preempted; a requeue continues the run) or FAILED."""
        for tracker in list(self.live):
            self._guard(tracker.name, lambda: tracker.close(status))
        self.live = []
