"""Inference: generation over the preallocated KV cache."""
