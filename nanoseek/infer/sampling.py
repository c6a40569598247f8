"""Sampling parameters and one batched sampling step.

Every row of a batch has its own parameters (temperature, top-k, top-p, min-p, penalties, seed);
one call processes the whole batch with tensor ops, no loop over rows or tokens.

Seeded sampling must give the same text whatever else shares the batch, so the randomness is not
drawn from a shared generator: each row's uniforms come from a counter-based hash of
(seed, step, token id), and the token is picked by the exponential race
argmax(log p - log(-log u)), which samples exactly from p.

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


def seeded_uniform(seeds: torch.Tensor, steps: torch.Tensor, n: int) -> torch.Tensor:
    """[B, n] uniforms in (0, 1), a pure function of (seed, step, column)."""
    h = _hash32(_hash32(seeds.clone()) ^ (steps & MASK32))
    cols = torch.arange(n, device=seeds.device)
    u = _hash32(h[:, None] ^ (cols[None, :] * 0x9E3779B1 & MASK32))
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


def sample(logits: torch.Tensor, temperature, top_k, top_p, min_p, seeds, steps) -> torch.Tensor:
    """Next token per row. logits [B, V] fp32 (penalties applied); per-row parameter tensors [B]."""
    greedy = temperature == 0
    if bool(greedy.all()):
        return logits.argmax(dim=-1)
    logits = logits / torch.where(greedy, 1.0, temperature)[:, None]
    V = logits.shape[-1]
    if bool((top_k > 0).any()):
        k = torch.where(top_k > 0, top_k.clamp(max=V), V)
        kth = logits.sort(dim=-1, descending=True).values.gather(1, (k - 1)[:, None])
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(dim=-1)
    if bool((min_p > 0).any()):
        probs = probs.masked_fill(probs < min_p[:, None] * probs.amax(dim=-1, keepdim=True), 0.0)
    if bool((top_p < 1).any()):
        sorted_p, idx = probs.sort(dim=-1, descending=True)
        before = sorted_p.cumsum(dim=-1) - sorted_p        # mass strictly above each token
        drop = (before >= top_p[:, None]) & (torch.arange(V, device=logits.device) > 0)
        probs = probs.scatter(1, idx, sorted_p.masked_fill(drop, 0.0))
    u = seeded_uniform(seeds, steps, V)
    race = probs.log() - u.log_().neg_().log_()   # in place: same values, fewer [B, V] passes
    return torch.where(greedy, logits.argmax(dim=-1), race.argmax(dim=-1))
