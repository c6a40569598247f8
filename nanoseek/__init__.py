"""nanoseek: the DeepSeek-V3 / R1 recipe, end to end, in small readable PyTorch.

    import nanoseek
    model, tok = nanoseek.load("model_dir_or_file.gguf")
    logits = model(torch.tensor([tok.encode("Hello")]))
    nanoseek.save(model, tok, "out_dir")
"""

from . import mkl
from .config import ModelConfig, preset
from .errors import NanoseekError
from .model.transformer import Transformer
from .version import __version__
from .weights import load, save

mkl.warm_up()  # before any multi-threaded float op: see mkl.py

__all__ = ["ModelConfig", "NanoseekError", "Transformer", "load", "preset", "save", "__version__"]
