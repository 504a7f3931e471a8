"""Everything on disk under `runs/`, with one owner: the run directory (`rundir.py`: layout, which checkpoint
a launch starts from), the checkpoint protocol (`checkpoint.py`: save, resume, reading back; `staging.py`:
the staging dir, COMPLETE marker and failed saves; `retention.py`: pruning and read locks), locks
(`locks.py`, the run lock too), checksums (`integrity.py`), DeepSpeed ZeRO state in a world-free file
(`zero_state.py`) and which run a command means without a recipe (`choose.py`). Each name has one import
path: the module that defines it.
Imports: data, models, cluster, base.
"""
