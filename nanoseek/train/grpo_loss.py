"""The GRPO objective and its variants, as pure tensor functions (tested against hand-computed cases).

    adv = group_advantages(rewards.view(n_prompts, G), variant)            # [n_prompts, G]
    w = token_weights(mask, variant, max_tokens)                           # [B, T], sums to <= 1
    loss, stats = policy_loss(logp, old_logp, ref_logp, adv.flatten(), mask, w, variant, ...)

GRPO (DeepSeekMath §4.1, DeepSeek-R1 §2.2.1), for a group of G outputs o_i of one prompt:
    A_i   = (r_i - mean(r)) / std(r)                      group-normalised advantage, one per output
    ρ_i,t = π_θ(o_i,t | ...) / π_old(o_i,t | ...)          per-token policy ratio
    L     = -1/G Σ_i 1/|o_i| Σ_t [ min(ρ A_i, clip(ρ, 1-ε, 1+ε) A_i) - β D_KL ]
    D_KL  = π_ref/π_θ - log(π_ref/π_θ) - 1                the k3 estimator: unbiased, always >= 0
Variants:
    dr_grpo  (Liu et al. 2025, "Understanding R1-Zero-like training"): A_i = r_i - mean(r) (no std),
             and the token sum is divided by a constant (the generation budget), not by |o_i|:
             both normalisations bias the gradient (toward easy/hard groups; toward long wrong answers).
    dapo     (Yu et al. 2025): clip-higher (ε_low 0.2, ε_high 0.28), token-level loss (every token of
             the batch weighs the same), dynamic sampling (groups whose rewards are all equal carry no
             signal and are dropped and refilled — done by the trainer) and overlong shaping (a reward).
std is the unbiased sample std (as TRL computes it); ε = 1e-4 guards all-equal groups (A = 0 there).
Token weights make micro-batching exact: the loss of the whole batch is the sum over micro-batches.
"""

from __future__ import annotations

import torch

VARIANTS = ("grpo", "dr_grpo", "dapo")
DEFAULT_CLIP = {"grpo": (0.2, 0.2), "dr_grpo": (0.2, 0.2), "dapo": (0.2, 0.28)}


def group_advantages(rewards: torch.Tensor, variant: str = "grpo", eps: float = 1e-4) -> torch.Tensor:
    """rewards [n_groups, G] -> advantages [n_groups, G]."""
    centered = rewards - rewards.mean(dim=1, keepdim=True)
    if variant == "dr_grpo":
        return centered
    std = rewards.std(dim=1, keepdim=True) if rewards.shape[1] > 1 else torch.zeros_like(centered[:, :1])
    return centered / (std + eps)


def token_weights(mask: torch.Tensor, variant: str = "grpo", max_tokens: int | None = None) -> torch.Tensor:
    """Per-token weights of the loss for a whole batch; mask [B, T] marks completion tokens."""
    mask = mask.float()
    B = mask.shape[0]
    if variant == "grpo":      # mean over each sequence's tokens, then over sequences
        return mask / (mask.sum(1, keepdim=True).clamp(min=1) * B)
    if variant == "dr_grpo":   # a constant normaliser: the generation budget
        return mask / (B * (max_tokens or mask.shape[1]))
    if variant == "dapo":      # token-level: all tokens of the batch equal
        return mask / mask.sum().clamp(min=1)
    raise ValueError(f"unknown variant {variant!r}; choose one of {', '.join(VARIANTS)}")


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(π_θ || π_ref) from samples of π_θ (Schulman, 'Approximating KL')."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1


def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, ref_logp: torch.Tensor | None, adv: torch.Tensor,
                mask: torch.Tensor, weights: torch.Tensor, clip_low: float = 0.2, clip_high: float = 0.2,
                beta: float = 0.0) -> tuple[torch.Tensor, dict]:
    """Clipped surrogate (+ β·k3 KL) summed with `weights`. logp/old_logp/ref_logp/mask/weights [B, T],
    adv [B]. Returns (loss, stats) with stats summed the same way (clip fraction, KL)."""
    ratio = torch.exp(logp - old_logp)
    a = adv[:, None]
    unclipped, clipped = ratio * a, torch.clamp(ratio, 1 - clip_low, 1 + clip_high) * a
    per_token = -torch.minimum(unclipped, clipped)
    kl = k3_kl(logp, ref_logp) if ref_logp is not None else None
    if kl is not None and beta:
        per_token = per_token + beta * kl
    loss = (per_token * weights).sum()
    with torch.no_grad():
        m = mask.float()
        clipped_now = ((ratio < 1 - clip_low) & (a < 0)) | ((ratio > 1 + clip_high) & (a > 0))
        stats = {"clip_frac": (clipped_now.float() * m).sum().item(), "tokens": m.sum().item(),
                 "kl": (kl * m).sum().item() if kl is not None else 0.0}
    return loss, stats


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Per-position entropy of softmax(logits) [..., V] -> [...]."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)
