"""nanoseek's version (a leaf, so weights/ can stamp saved files without importing the package facade)."""

__version__ = "0.1.0"
