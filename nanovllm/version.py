"""The package version, importable from any layer (the compile cache keys on it)."""
__version__ = "0.1.0"
