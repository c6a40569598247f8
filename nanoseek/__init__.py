"""nanoseek: the DeepSeek-V3 / R1 recipe in small readable PyTorch."""
__version__ = "0.1.0"
