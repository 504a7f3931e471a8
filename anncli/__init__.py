"""ann: train and evaluate the Asymmetric Non-local Network for semantic segmentation."""
from anncli.version import __version__  # noqa: F401  (`anncli.__version__`)

__all__ = ["load_model"]


def __getattr__(name: str):
    # `import anncli` stays light: torch is imported only when load_model is first used.
    if name == "load_model":
        from anncli.api import load_model

        return load_model
    raise AttributeError(f"module 'anncli' has no attribute {name!r}")
