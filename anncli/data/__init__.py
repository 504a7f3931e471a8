"""Datasets as WebDataset shards: manifests (`manifest.py`), the shard format (`shards.py`), sample counts
(`counts.py`), the world-size-free sample order and training stream (`order.py`, `global_stream.py`),
loaders, packing of public datasets (`datasets.py`, `voc.py`), the synthetic set (`synth.py`), augmentation
(`transforms.py`) and inspection (`inspect.py`).
Imports: cluster (a barrier while the synthetic set is made) and base.
"""
