"""The C++ kernels the model's layers call on CPU once installed: `installed` is nanoseek.infer.kernels
after train.run.use_cpu_kernels (every training command calls it), else None and the layers run
PyTorch's ops and SDPA. The same functions either way (tests/test_ffn_kernels.py, test_norm_kernel.py,
test_rope_kernel.py; the training attention: tests/test_model.py).
The layers ask `kernels_for(tensor)`; this module imports nothing of nanoseek's, so imports still only
go down (model -> infer would not)."""

from __future__ import annotations

import torch

installed = None


def kernels_for(t: torch.Tensor):
    """The installed kernels where they apply to t (CPU, fp32 or bf16, not inside torch.compile, which fuses
    these ops itself), else None."""
    k = installed
    if (k is None or t.device.type != "cpu" or t.dtype not in (torch.float32, torch.bfloat16)
            or torch.compiler.is_compiling()):
        return None
    return k
