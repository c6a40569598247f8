"""nanoseek: the DeepSeek-V3 / R1 recipe, end to end, in small readable PyTorch.

    import nanoseek
    model, tok = nanoseek.load("model_dir_or_file.gguf")
    logits = model(torch.tensor([tok.encode("Hello")]))
    nanoseek.save(model, tok, "out_dir")
"""

# first: they settle MKL's vector math and inductor's vector width before anything computes or compiles
from . import inductor, mkl  # noqa: F401
from .config import ModelConfig, preset
from .errors import NanoseekError
from .model.transformer import Transformer
from .version import __version__
from .weights import load, save

__all__ = ["ModelConfig", "NanoseekError", "Transformer", "load", "preset", "save", "__version__"]
