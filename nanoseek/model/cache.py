"""Preallocated caches for decoding, one row (slot) per sequence, two tensors per layer:

* `LatentCache` (MLA): per token per layer the normalized latent c_kv [kv_lora_rank] and the
  rotated shared key k_pe [qk_rope_head_dim] — `kv_lora_rank + qk_rope_head_dim` values.
* `KVCache` (GQA, MHA): rotated keys and values, `2 * num_key_value_heads * head_dim` values.
The shapes come from `ModelConfig.kv_cache_shapes()`; `KVCache.for_model` picks the class.

Each row fills from position 0; a token at position p is written at index p of its row, and a
query at p attends to indices 0..p of its row (see `cache_mask`). Rows may hold
sequences of different lengths, so requests can join and leave a batch between steps.

    cache = KVCache.for_model(cfg, batch_size=8, max_seq_len=2048, dtype=torch.float32)
    logits = model(ids, positions=pos, cache=cache)
"""

from __future__ import annotations

import math

import torch

from ..config import ModelConfig


def cache_mask(positions: torch.Tensor, kv_len: int) -> torch.Tensor:
    """[B, 1, T, S] boolean: query at position p sees cached keys 0..p of its own row."""
    keys = torch.arange(kv_len, device=positions.device)
    return (keys[None, None, :] <= positions[:, :, None])[:, None]


def _layout(shape: tuple[int, ...], max_seq_len: int) -> tuple[int, ...]:
    """A row's entries for one layer: [heads, max_seq_len, dim] for per-head shapes, else [max_seq_len, dim]."""
    return (shape[0], max_seq_len, *shape[1:]) if len(shape) == 2 else (max_seq_len, *shape)


class KVCache:
    """Keys (`a`) and values (`b`) of every layer and row. Entries of one head per position ([kv_heads,
    head_dim]) are stored head-major, [layers, rows, kv_heads, max_seq_len, head_dim], so that a head's
    keys are one contiguous run (over position-major keys the decode-attention kernel read each head's
    128 bytes out of every 384 of SmolLM2's rows: 1.55x slower at 156 keys, 1.8x at 1024;
    docs/benchmarks.md); `update` returns them as [rows, kv_len, kv_heads, head_dim] views all the same.
    Other entries (MLA's latent and rotary key) are [layers, rows, max_seq_len, dim].

    `decode_attention`, when set, is a fused attention for one new token per row that GQA uses in
    place of SDPA: f(q [B, 1, H, D], k [B, S, G, D], v, mask [B, 1, 1, S], scale) -> [B, 1, H, Dv]
    (the engine sets it to the C++ kernel, nanoseek.infer.kernels, where it has one)."""

    decode_attention = None

    def __init__(self, shapes: tuple[tuple[int, ...], tuple[int, ...]], num_layers: int,
                 batch_size: int, max_seq_len: int, dtype=torch.float32, device=None):
        self.batch_size, self.max_seq_len, self.shapes = batch_size, max_seq_len, shapes
        self.head_major = len(shapes[0]) == 2  # K and V [kv_heads, head_dim] (MLA's entries have no heads)
        self.a, self.b = (torch.zeros(num_layers, batch_size, *_layout(shape, max_seq_len), dtype=dtype, device=device)
                          for shape in shapes)
        self._step = None

    @classmethod
    def for_model(cls, cfg: ModelConfig, batch_size: int, max_seq_len: int, dtype=torch.float32,
                  device=None, num_layers: int | None = None) -> "KVCache":
        """A LatentCache for an MLA model, else a KVCache, sized from the config."""
        kind = LatentCache if cfg.is_mla else KVCache
        return kind(cfg.kv_cache_shapes(), num_layers or cfg.num_hidden_layers, batch_size, max_seq_len, dtype, device)

    def prepare(self, positions: torch.Tensor) -> "KVCache":
        """Compute this forward's (rows, kv_len, mask) now, once for all layers. Done outside a
        compiled forward, it keeps the data-dependent kv_len out of the graph (no graph break):
        inside, kv_len is read off the mask's shape."""
        B, T = positions.shape
        kv_len = int(positions.max()) + 1
        if kv_len > self.max_seq_len:
            raise ValueError(f"sequence length {kv_len} exceeds the cache's max_seq_len {self.max_seq_len}")
        rows = torch.arange(B, device=positions.device)[:, None].expand(B, T)
        if self.head_major:  # (rows, heads, positions) broadcast to [B, T, G]: the entries [B, T, G, D] of a layer
            heads = torch.arange(self.shapes[0][0], device=positions.device)
            where = (rows[..., None], heads, positions[..., None])
        else:
            where = (rows, positions)
        self._step = (positions, where, cache_mask(positions, kv_len))
        return self

    def update(self, layer: int, positions: torch.Tensor, a: torch.Tensor, b: torch.Tensor):
        """Write the new tokens' entries; return this layer's rows [:B, :kv_len] and the attention
        mask [B, 1, T, kv_len]."""
        if self._step is None or self._step[0] is not positions:
            self.prepare(positions)
        _, where, mask = self._step
        B, kv_len = positions.shape[0], mask.shape[-1]
        # one index_put_ on the whole cache tensor, not on its layer's view: torch.compile then writes in
        # place (mutating a view of a graph input made it copy each layer's whole cache rows every step)
        layers = torch.full_like(where[0], layer)
        self.a.index_put_((layers, *where), a.to(self.a.dtype))
        self.b.index_put_((layers, *where), b.to(self.b.dtype))
        if self.head_major:
            return self.a[layer, :B, :, :kv_len].transpose(1, 2), self.b[layer, :B, :, :kv_len].transpose(1, 2), mask
        return self.a[layer, :B, :kv_len], self.b[layer, :B, :kv_len], mask

    def rows(self, start: int, stop: int) -> "KVCache":
        """A view of rows [start, stop) sharing storage: batch row i of a forward is cache row start+i."""
        view = object.__new__(type(self))
        view.batch_size, view.max_seq_len, view.shapes, view.head_major = (stop - start, self.max_seq_len, self.shapes,
                                                                          self.head_major)
        view.a, view.b = self.a[:, start:stop], self.b[:, start:stop]
        view._step, view.decode_attention = None, self.decode_attention
        return view

    def copy_row(self, src: int, dst: int, length: int) -> None:
        """Move a sequence to another row (the engine keeps active rows contiguous)."""
        for t in (self.a, self.b):
            if self.head_major:
                t[:, dst, :, :length] = t[:, src, :, :length]
            else:
                t[:, dst, :length] = t[:, src, :length]

    def bytes_per_token(self) -> int:
        """Bytes cached per token across all layers."""
        return self.a.shape[0] * sum(math.prod(s) for s in self.shapes) * self.a.element_size()


class LatentCache(KVCache):
    """MLA's cache (DeepSeek-V2 §2.1): the latent c_kv (`a`, [layers, rows, max_seq_len, kv_lora_rank])
    and the shared rotary key k_pe (`b`, [..., qk_rope_head_dim]); short steps (decode) absorb kv_b_proj
    into the query and the output (attention.MLA._absorbed), so per-head keys and values are not rebuilt."""
