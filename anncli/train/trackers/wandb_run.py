"""Weights & Biases: one W&B run per run directory, continued after a resume (its id is kept in trackers.json).

`run.log()` returns before wandb's service has written the step, so a kill can lose steps that were
logged. What a resumed launch takes as W&B's is what W&B itself holds: offline, the history of the run's
earlier offline files, read with wandb's own reader (`wandb leet inspect --json`); online, the steps below
the run's `starting_step`, which W&B's server reports at resume. The steps of events.jsonl above it are
logged again. W&B keeps a run's steps increasing and drops a step that is not above its last one; a step
logged again that W&B did have is dropped that way.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from anncli.runs.rundir import flatten
from anncli.train.trackers.history import StepRecord
from anncli.train.trackers.worker import warn, why

SERVICE = "wandb-core"  # the name of the process wandb starts to write and upload runs


class WandbTracker:
    name = "wandb"

    @staticmethod
    def prepare(recipe) -> None:
        """Nothing to check before the tracker's thread starts."""

    def __init__(self, recipe, run_dir: Path, saved: dict):
        import wandb

        cfg = recipe.logging.wandb
        self.run = wandb.init(project=cfg.project, entity=cfg.entity, name=cfg.name or recipe.name, mode=cfg.mode,
                              dir=str(run_dir), id=saved.get("id"), resume="allow",
                              settings=wandb.Settings(console="off"))
        self.run_dir, self.new, self.saved = Path(run_dir), not saved.get("id"), saved
        self.state = {"id": self.run.id}

    def describe(self, recipe) -> None:
        """A new W&B run gets the flattened recipe as its config."""
        if self.new:
            self.run.config.update(flatten(recipe.model_dump(mode="json")))

    def known_step(self) -> int:
        """The last step W&B holds of this run from earlier launches."""
        if self.new or self.run.disabled:
            return 0
        if not self.run.offline:
            return max(self.run.starting_step - 1, 0)
        own = Path(self.run.dir).parent  # this launch's offline-run-* folder
        files = [f for f in sorted(own.parent.glob(f"offline-run-*-{self.run.id}/run-{self.run.id}.wandb"))
                 if f.parent != own]
        try:
            return max((last_history_step(f) for f in files), default=0)
        except (OSError, RuntimeError, subprocess.SubprocessError) as e:
            last = int(self.saved.get("last_step", 0))
            warn(f"wandb: cannot read the earlier offline runs ({why(e, 'wandb')}); taking steps up to {last} as written")
            return last

    def log(self, records: list[StepRecord]) -> None:
        for record in records:
            self.run.log(record.values, step=record.step)
            for path in record.files:
                self.run.save(str(path), base_path=str(self.run_dir), policy="now")

    def close(self, status: str) -> None:
        self.run.finish(exit_code=0 if status == "FINISHED" else 1)

    @staticmethod
    def abandon() -> None:
        """Stop this process's W&B service when it did not finish in time: wandb's exit hook waits for it."""
        import wandb

        from anncli.cluster.supervisor import descendants

        for pid in descendants(os.getpid()):
            try:
                if Path(f"/proc/{pid}/comm").read_text().strip() == SERVICE:
                    os.kill(pid, signal.SIGKILL)
            except OSError:  # ended meanwhile
                pass
        try:
            wandb.teardown()  # unhooks wandb's exit hook; the service is gone, so it fails
        except Exception:  # noqa: BLE001
            pass


def last_history_step(path: Path) -> int:
    """The last history step of one W&B run file, read with wandb's own reader (0 without history)."""
    done = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(path)],
                          capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    steps = []
    for line in done.stdout.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and record.get("type") == "history":
            steps.append(int(record["history"].get("step", {}).get("num", 0)))
    if done.returncode != 0 and not steps:
        raise RuntimeError(f"wandb leet inspect {path.name}: {(done.stderr.strip().splitlines() or ['failed'])[-1]}")
    return max(steps, default=0)
