"""Sampling parameters and one batched sampling step.

Every row of a batch has its own parameters (temperature, top-k, top-p, min-p, penalties, seed);
one call processes the whole batch with tensor ops, no loop over rows or tokens.

Seeded sampling must give the same text whatever else shares the batch, so the randomness is not
drawn from a shared generator: each row's uniforms come from a counter-based hash of
(seed, step, token id), and the token is picked by the exponential race
argmax(log p - log(-log u)), which samples exactly from p. With top-p on every row, the race runs
among the NUCLEUS_K most likely tokens only (the nucleus almost always lies within them; a batch
where it does not takes the full sort): one top-k instead of a sort of the vocabulary, and uniforms
for K columns instead of V, with the same uniforms per column, so the same tokens.

    params = SamplingParams(max_tokens=256, temperature=0.6, top_p=0.95, seed=0)   # one per request
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 1.0          # 0 = greedy
    top_k: int = 0                    # 0 = off
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0   # CTRL-style, on prompt and output tokens
    presence_penalty: float = 0.0     # OpenAI-style, on output tokens
    frequency_penalty: float = 0.0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    seed: int | None = None
    logprobs: bool = False

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        checks = [
            (self.max_tokens >= 1, "max_tokens must be >= 1"),
            (self.temperature >= 0, "temperature must be >= 0"),
            (self.top_k >= 0, "top_k must be >= 0"),
            (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (0 <= self.min_p <= 1, "min_p must be in [0, 1]"),
            (self.repetition_penalty > 0, "repetition_penalty must be > 0"),
            (-2 <= self.presence_penalty <= 2, "presence_penalty must be in [-2, 2]"),
            (-2 <= self.frequency_penalty <= 2, "frequency_penalty must be in [-2, 2]"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def penalized(self) -> bool:
        return self.repetition_penalty != 1 or self.presence_penalty != 0 or self.frequency_penalty != 0


MASK32 = 0xFFFFFFFF
NUCLEUS_K = 64  # top-p looks for its nucleus among this many most likely tokens first


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer mix (products stay below 2^63, so int64 never overflows). Works in place
    on x: on [batch, vocab] every extra temporary is another pass over ~6 MB per step."""
    x &= MASK32
    for _ in range(2):
        x ^= x >> 16
        x *= 0x45D9F3B
        x &= MASK32
    x ^= x >> 16
    return x


def seeded_uniform(seeds: torch.Tensor, steps: torch.Tensor, cols: int | torch.Tensor) -> torch.Tensor:
    """[B, n] uniforms in (0, 1), a pure function of (seed, step, column): columns 0..cols-1, or the
    columns given ([n] or [B, n])."""
    h = _hash32(_hash32(seeds.clone()) ^ (steps & MASK32))
    if isinstance(cols, int):
        cols = torch.arange(cols, device=seeds.device)
    u = _hash32(h[:, None] ^ (cols.expand(len(h), -1) * 0x9E3779B1 & MASK32))
    u >>= 8
    # (2^24 - 0.5) / 2^24 rounds to 1.0 in float32, and -log(-log(1)) = inf would win the race
    return u.float().add_(0.5).mul_(2.0 ** -24).clamp_(max=1 - 2**-24)  # * 2^-24 is exact


def apply_penalties(logits, out_counts, seen, rep, presence, frequency):
    """logits [B, V]; out_counts [B, V] output-token counts; seen [B, V] bool (prompt + output)."""
    if bool((rep != 1).any()):
        r = rep[:, None]
        penalized = torch.where(logits > 0, logits / r, logits * r)
        logits = torch.where(seen, penalized, logits)
    if bool((presence != 0).any() or (frequency != 0).any()):
        logits = logits - presence[:, None] * (out_counts > 0) - frequency[:, None] * out_counts
    return logits


def greedy_pick(logits: torch.Tensor) -> torch.Tensor:
    """argmax over the last dim (the first of equal maxima, as argmax): torch.max's indices, 2.5x
    faster than argmax on CPU for [32, 49152] fp32 (0.7 against 1.7 ms, 2026-12-06)."""
    return logits.max(dim=-1).indices


def sample(logits: torch.Tensor, temperature, top_k, top_p, min_p, seeds, steps) -> torch.Tensor:
    """Next token per row. logits [B, V] fp32 (penalties applied); per-row parameter tensors [B]."""
    greedy = temperature == 0
    if bool(greedy.all()):
        return greedy_pick(logits)
    logits = logits / torch.where(greedy, 1.0, temperature)[:, None]
    V = logits.shape[-1]
    if bool((top_k > 0).any()):
        k = torch.where(top_k > 0, top_k.clamp(max=V), V)
        kth = logits.sort(dim=-1, descending=True).values.gather(1, (k - 1)[:, None])
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(dim=-1)
    if bool((min_p > 0).any()):
        probs = probs.masked_fill(probs < min_p[:, None] * probs.amax(dim=-1, keepdim=True), 0.0)
    if bool(((top_p < 1) | greedy).all()) and V > NUCLEUS_K:
        pick = _nucleus_race(probs, top_p, greedy, seeds, steps)
        if pick is not None:
            return torch.where(greedy, greedy_pick(logits), pick)
    if bool((top_p < 1).any()):
        sorted_p, idx = probs.sort(dim=-1, descending=True)
        probs = probs.scatter(1, idx, sorted_p.masked_fill(_outside_nucleus(sorted_p, top_p), 0.0))
    race = _race(probs, seeded_uniform(seeds, steps, V))
    return torch.where(greedy, greedy_pick(logits), greedy_pick(race))


def _outside_nucleus(sorted_p: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Of probabilities sorted in descending order per row, those past the smallest prefix holding
    top_p of the mass (the first always stays)."""
    before = sorted_p.cumsum(dim=-1) - sorted_p        # mass strictly above each token
    return (before >= top_p[:, None]) & (torch.arange(sorted_p.shape[-1], device=sorted_p.device) > 0)


def _race(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """The exponential race's keys, log p - log(-log u): their argmax is a sample of p. In place on u:
    same values, fewer passes over [B, V]."""
    return probs.log() - u.log_().neg_().log_()


def _nucleus_race(probs, top_p, greedy, seeds, steps) -> torch.Tensor | None:
    """The exponential race among each row's top-p nucleus, found among its NUCLEUS_K most likely
    tokens; None when a sampled (not greedy) row's nucleus is wider (its top K hold less than top_p
    of its mass)."""
    top, idx = probs.topk(NUCLEUS_K, dim=-1)                # sorted, as a full sort's first K
    if not bool(((top.cumsum(dim=-1)[:, -1] >= top_p) | greedy).all()):  # summed in the full sort's order
        return None
    u = seeded_uniform(seeds, steps, idx)                   # the same uniforms as the full race's columns
    race = _race(top.masked_fill(_outside_nucleus(top, top_p), 0.0), u)
    return idx.gather(1, race.argmax(dim=-1, keepdim=True))[:, 0]
