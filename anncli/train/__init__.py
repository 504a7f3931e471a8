"""Training: the loop (`loop.py`, top to bottom: step, log, checkpoint, validate, preempt), the engines
(`engine.py`: DDP and DeepSpeed), the plan of a run (`plan.py`: batch split, LR scaling and schedule,
`--dry-run`) the losses (`losses.py`: CE, OHEM, aux weighting) and the experiment trackers (`trackers/`: W&B, MLflow).
Imports: interop (peer weights for `--init-from`, plots for the trackers), eval (validation), runs, data, models,
cluster, base.
"""
