"""Training: the loop (`loop.py`, top to bottom: step, log, checkpoint, validate, preempt), the engines
(`engine.py`: DDP and DeepSpeed), the plan of a run (`plan.py`: batch split, LR scaling and schedule,
`--dry-run`) and the losses (`losses.py`: CE, OHEM, aux weighting).
Imports: interop (peer weights for `--init-from`), eval (validation), runs, data, models, cluster, base.
"""
