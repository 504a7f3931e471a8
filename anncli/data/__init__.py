"""Datasets as WebDataset shards: manifests (`manifest.py`), the shard format (`shards.py`), opening a
shard's bytes (`streams.py`), what a shard may cost (`guards.py`), image files and decoding (`images.py`),
sample counts (`counts.py`), the world-size-free sample order and training stream (`order.py`,
`sample_reader.py`, `global_stream.py`), loaders, packing of public datasets (`datasets.py`, `voc.py`),
the synthetic set (`synth.py`), augmentation (`transforms.py`) and inspection (`inspect.py`).
Imports: cluster (a barrier while the synthetic set is made) and base.
"""
