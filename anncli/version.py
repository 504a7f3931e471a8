"""The package version: one place, read by `ann --version`, `ann env` and the build (pyproject.toml)."""

__version__ = "0.1.0"
