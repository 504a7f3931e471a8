"""The tool's edges to other tools: peer weights in (`weights.py`: the official code, mmsegmentation),
networks out (`export.py`: ONNX, TorchScript), pictures (`plot.py`, `viz.py`) and measurements
(`bench.py`, `summary.py`, `flops.py`).
Imports: eval, runs, data, models, cluster, base; never train or cli.
"""
