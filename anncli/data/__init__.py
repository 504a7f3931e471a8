"""Datasets as WebDataset shards: manifests, the shard format, the training stream, loaders, packing (datasets),
the synthetic set (synth), augmentation (transforms) and inspection."""
