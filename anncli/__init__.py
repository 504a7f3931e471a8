"""ann: train and evaluate the Asymmetric Non-local Network for semantic segmentation."""
__version__ = "0.1.0"
