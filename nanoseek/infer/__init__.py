"""Inference: the continuous-batching engine, sampling, and the simple reference decoder.

    from nanoseek.infer import Engine, SamplingParams
    outs = Engine(model, tok, max_batch_size=8).generate(prompts, SamplingParams(max_tokens=64))
"""

from .engine import Delta, Engine, QueueFull, RequestOutput
from .sampling import SamplingParams

__all__ = ["Delta", "Engine", "QueueFull", "RequestOutput", "SamplingParams"]
