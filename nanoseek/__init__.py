"""nanoseek: the DeepSeek-V3 / R1 recipe, end to end, in small readable PyTorch.

    import nanoseek
    model, tok = nanoseek.load("model_dir_or_file.gguf")
    logits = model(torch.tensor([tok.encode("Hello")]))
    nanoseek.save(model, tok, "out_dir")
"""

__version__ = "0.1.0"

from .config import ModelConfig, preset  # noqa: E402
from .errors import NanoseekError  # noqa: E402
from .model.transformer import Transformer  # noqa: E402
from .weights import load, save  # noqa: E402

__all__ = ["ModelConfig", "NanoseekError", "Transformer", "load", "preset", "save", "__version__"]
