"""Inference: the continuous-batching engine, sampling, and the simple reference decoder."""

from .engine import Delta, Engine, QueueFull, RequestOutput
from .sampling import SamplingParams

__all__ = ["Delta", "Engine", "QueueFull", "RequestOutput", "SamplingParams"]
