"""Data: corpora, the synthetic arithmetic corpus, token files and training-window samplers.

    from nanoseek.data import arithmetic_corpus, read_documents, train_tokenizer, token_file, WindowSampler
"""

from .sampler import WindowSampler
from .synthetic import Problem, arithmetic_corpus, demo_prompts, problem, worked
from .tokens import cached_tokenizer, documents_hash, read_documents, token_file, train_tokenizer

__all__ = ["Problem", "WindowSampler", "arithmetic_corpus", "cached_tokenizer", "demo_prompts",
           "documents_hash", "problem", "read_documents", "token_file", "train_tokenizer", "worked"]
