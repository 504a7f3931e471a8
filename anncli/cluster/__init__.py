"""Where a process runs and what it starts: the launch matrix (`launch.py`: shell, SLURM, srun step,
Kubernetes pod, torchrun worker; `slurm.py`: the SLURM rows; `pytorchjob.py`: the Kubeflow operator's
variables and the pod row; `command.py`: the plan, torchrun's command line and the child's environment),
the supervisor of a launched command (`supervisor.py`: signals, exit codes), process groups, collectives
and sync-BN (`distributed.py`), and `ann env` (`env.py`).
Imports: base only; the wings above call it (the supervisor is told about checkpoints by its caller).
"""
