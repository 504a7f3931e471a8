"""The tool's edges to other tools: weights by URL or name (`sources.py`; the table `zoo.py`, the cache
`cache.py`, downloads `download.py`), peer weights in (`weights.py`, `peer_keys.py`: the official code, mmsegmentation),
networks out (`export.py`: ONNX, TorchScript), pictures (`plot.py`, `viz.py`) and measurements
(`bench.py`, `summary.py`, `flops.py`).
Imports: eval, runs, data, models, cluster, base; never train or cli.
"""
