"""Fixed-length training windows from a token array, in a seeded order, with a resumable position.

The token stream is cut into W = (n_tokens - 1) // seq_len non-overlapping windows of
seq_len + 1 tokens (inputs are the first seq_len, targets the last seq_len; the MTP modules use
the extra token too). Epoch e visits the windows in the order of a permutation seeded by
(seed, e). `position` counts the windows handed out so far over all ranks, so
`state_dict()` / `load_state_dict()` restart exactly where a run stopped, and every rank of a
torchrun job takes its own rows of the same global batch.

    sampler = WindowSampler(tokens, seq_len=256, seed=0)
    x = sampler.next_batch(16)                     # LongTensor [16, 257]
    x = sampler.next_batch(16, rank=1, world=2)    # rows 8..15 of the same global batch
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import NanoseekError

SEED_STRIDE = 1_000_003  # a prime: seed * SEED_STRIDE + i gives every (run seed, stream i) its own seed


def sub_seed(seed: int, i: int) -> int:
    """The seed of stream `i` (an epoch, a sample) of a run seeded with `seed`."""
    return seed * SEED_STRIDE + i


class WindowSampler:
    def __init__(self, tokens: np.ndarray, seq_len: int, seed: int = 0):
        if seq_len < 2:
            raise NanoseekError(f"--seq-len must be at least 2, got {seq_len}")
        self.tokens, self.seq_len, self.seed = tokens, seq_len, seed
        self.n_windows = (len(tokens) - 1) // seq_len
        if self.n_windows < 1:
            raise NanoseekError(f"the corpus has {len(tokens)} tokens, fewer than one training sequence "
                                f"of {seq_len} + 1; add text or lower --seq-len")
        self.position = 0
        self._perm: tuple[int, np.ndarray] | None = None

    def _order(self, epoch: int) -> np.ndarray:
        if self._perm is None or self._perm[0] != epoch:
            g = torch.Generator().manual_seed(sub_seed(self.seed, epoch))
            self._perm = (epoch, torch.randperm(self.n_windows, generator=g).numpy())
        return self._perm[1]

    def window(self, index: int) -> np.ndarray:
        """The index-th window handed out since the start (any epoch)."""
        epoch, i = divmod(index, self.n_windows)
        start = int(self._order(epoch)[i]) * self.seq_len
        return self.tokens[start:start + self.seq_len + 1]

    def next_batch(self, global_batch: int, rank: int = 0, world: int = 1) -> torch.Tensor:
        """This rank's rows [global_batch // world, seq_len + 1] of the next global batch."""
        if global_batch % world:
            raise NanoseekError(f"global batch {global_batch} is not divisible by {world} processes")
        local = global_batch // world
        first = self.position + rank * local
        rows = np.stack([self.window(first + j) for j in range(local)]).astype(np.int64)
        self.position += global_batch
        return torch.from_numpy(rows)

    @property
    def epoch(self) -> float:
        return self.position / self.n_windows

    def state_dict(self) -> dict:
        return {"position": self.position, "seed": self.seed, "seq_len": self.seq_len,
                "n_windows": self.n_windows}

    def load_state_dict(self, state: dict) -> None:
        for k in ("seed", "seq_len", "n_windows"):
            if state.get(k) != getattr(self, k):
                raise NanoseekError(f"the checkpoint's data sampler has {k}={state.get(k)}, this run "
                                    f"{getattr(self, k)}: resume with the same corpus, --seq-len and --seed")
        self.position = int(state["position"])
