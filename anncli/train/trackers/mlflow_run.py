"""MLflow: one MLflow run per run directory, continued after a resume (its id is kept in trackers.json)."""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path
from urllib.parse import urlparse

from anncli.errors import UserError
from anncli.runs.rundir import flatten
from anncli.train.trackers.history import StepRecord

METRICS_PER_REQUEST = 1000  # log_batch's limits
PARAMS_PER_REQUEST = 100


def check_tracking_uri(configured: str | None) -> None:
    """MLflow 3 (mlflow-skinny too) refuses a file store, `file://…` or a folder, unless MLFLOW_ALLOW_FILE_STORE
    is true: one line before training starts instead of a tracker that fails."""
    uri, where = configured, "logging.mlflow.tracking_uri"
    if uri is None:
        uri, where = os.environ.get("MLFLOW_TRACKING_URI"), "MLFLOW_TRACKING_URI"
    if not uri or os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").strip().lower() in ("1", "true"):
        return
    if urlparse(uri).scheme in ("", "file"):
        raise UserError(f"{where} {uri}: MLflow refuses a file store (file:// or a folder) unless "
                        "MLFLOW_ALLOW_FILE_STORE=true; use a database, e.g. sqlite:///mlflow.db, or an http(s):// "
                        "tracking server")


class MlflowTracker:
    name = "mlflow"

    @staticmethod
    def prepare(recipe) -> None:
        """On the training thread, before the tracker's thread starts (it sets the environment)."""
        check_tracking_uri(recipe.logging.mlflow.tracking_uri)
        # Each request tried twice, 20 s each, not mlflow's minutes of back-off (unless the user set them).
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")

    @staticmethod
    def abandon() -> None:
        """Nothing to stop: a request that never returns holds only the tracker's daemon thread."""

    def __init__(self, recipe, run_dir: Path, saved: dict):
        import mlflow

        cfg = recipe.logging.mlflow
        self.client = mlflow.MlflowClient(tracking_uri=cfg.tracking_uri)
        self.uri = mlflow.get_tracking_uri() if cfg.tracking_uri is None else cfg.tracking_uri
        self.entities, self.run_dir, self.new = mlflow.entities, Path(run_dir), True
        if saved.get("run_id") and saved.get("tracking_uri") == self.uri:
            self.run_id, self.new = saved["run_id"], False
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            name = cfg.experiment or recipe.name
            experiment = self.client.get_experiment_by_name(name)
            experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(name)
            self.run_id = self.client.create_run(experiment_id, run_name=cfg.run_name or recipe.name).info.run_id
        self.known = 0 if self.new else int(saved.get("last_step", 0))
        self.state = {"run_id": self.run_id, "tracking_uri": self.uri, "last_step": self.known}

    def describe(self, recipe) -> None:
        """A new MLflow run gets the flattened recipe as parameters."""
        if not self.new:
            return
        params = [self.entities.Param(k, json.dumps(v) if isinstance(v, (list, dict)) else str(v))
                  for k, v in flatten(recipe.model_dump(mode="json")).items()]
        for i in range(0, len(params), PARAMS_PER_REQUEST):
            self.client.log_batch(self.run_id, params=params[i : i + PARAMS_PER_REQUEST])

    def known_step(self) -> int:
        """The last step the server acknowledged to an earlier launch (trackers.json)."""
        return self.known

    def log(self, records: list[StepRecord]) -> None:
        for metrics in self._requests(records):
            self.client.log_batch(self.run_id, metrics=metrics)
        for record in records:
            for path in record.files:
                folder = path.parent.relative_to(self.run_dir).as_posix()  # val/step-000004.json stays under val/
                self.client.log_artifact(self.run_id, str(path), artifact_path=None if folder == "." else folder)

    def _requests(self, records: list[StepRecord]) -> list[list]:
        """The records' metrics in log_batch requests, a step never split unless it alone is over the limit."""
        now, requests, current = int(time.time() * 1000), [], []
        for record in records:
            metrics = [self.entities.Metric(_key(k), float(v), now, record.step)
                       for k, v in record.values.items() if isinstance(v, (int, float))]
            if current and len(current) + len(metrics) > METRICS_PER_REQUEST:
                requests.append(current)
                current = []
            current += metrics
            while len(current) > METRICS_PER_REQUEST:
                requests.append(current[:METRICS_PER_REQUEST])
                current = current[METRICS_PER_REQUEST:]
        return requests + [current] if current else requests

    def close(self, status: str) -> None:
        self.client.set_terminated(self.run_id, status=status)


def _key(key: str) -> str:
    """MLflow keys take letters, digits and _ - . space /; a class name with others gets _ instead."""
    return re.sub(r"[^\w\-. /]", "_", key)
