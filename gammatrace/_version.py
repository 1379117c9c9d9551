"""The package version, in a module of its own so that any layer can record it in a run's
provenance without importing the package root (which sits above every layer)."""

__version__ = "0.1.0"
