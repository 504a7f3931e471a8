"""Training: the loop (`loop.py`, top to bottom: step, log, checkpoint, validate, preempt), the engines
(`engine.py`: DDP and DeepSpeed), the plan of a run (`plan.py`: batch split, LR scaling and schedule,
`--dry-run`) the losses (`losses.py`: CE, OHEM, aux weighting), the experiment trackers (`trackers/`: W&B, MLflow)
and the run's weights made local files before its model is built (`local_weights.py`).
Imports: interop (weights by URL or name, peer weights for `--init-from`, plots for the trackers), eval (validation), runs, data, models,
cluster, base.
"""
