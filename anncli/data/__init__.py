"""Datasets as WebDataset shards: packing (datasets), the synthetic set (synth), reading (shards), augmentation."""
