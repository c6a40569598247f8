"""torch.compile's CPU vector width, matched to ATen's when ATEN_CPU_CAPABILITY caps it.

With ATEN_CPU_CAPABILITY=avx2 on an AVX-512 machine (as benchmarks/decode.py --isa avx2 runs an
AVX2 machine's code), inductor's generated C++ for a plain SwiGLU came out wrong in torch 2.13:
0.89 relative error on 4,096 x 64 values, NaN at 4,107 rows (2026-12-07). With its vector width
set explicitly (cpp.simdlen) to 256 or 512 bits, the same kernels are exact. So at import (which
`import nanoseek` does, before anything compiles) an ATen capability set in the environment sets
the width to match, for every torch.compile in the process; without the variable, or with a width
the user chose, nothing changes (and inductor's config is not even imported).

    import nanoseek   # does it
"""

from __future__ import annotations

import os

SIMDLEN = {"default": 0, "avx2": 256, "avx512": 512}  # ATEN_CPU_CAPABILITY -> vector bits (0: scalar)


def match_aten_capability() -> None:
    """Set inductor's cpp.simdlen from ATEN_CPU_CAPABILITY (if set, and the width is not chosen already)."""
    width = SIMDLEN.get(os.environ.get("ATEN_CPU_CAPABILITY", "").lower())
    if width is None:
        return
    import torch._inductor.config as inductor_config
    if inductor_config.cpp.simdlen is None:
        inductor_config.cpp.simdlen = width


match_aten_capability()  # at import: the environment is the process's, and so is the width
