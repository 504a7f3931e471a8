"""Everything on disk under `runs/`, with one owner: the run directory (`rundir.py`: layout, which checkpoint
a launch starts from, locks), the checkpoint protocol (`checkpoint.py`: staging, COMPLETE marker, pruning,
reading back), checksums (`integrity.py`), DeepSpeed ZeRO state in a world-free file (`zero_state.py`) and
which run a command means without a recipe (`choose.py`).
Imports: data, models, cluster, base.
"""
