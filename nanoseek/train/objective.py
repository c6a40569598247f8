"""The pretraining objective of DeepSeek-V3 (§2.1.2, §2.2): next-token loss, MTP loss, the
sequence-wise balance loss, and the auxiliary-loss-free bias update.

    L = L_main + λ · L_MTP + L_Bal            (λ = 0.3, then 0.1 for the last third: mtp_weight)

Next token: window x_0..x_T, inputs x_0..x_{T-1}, position i predicts x_{i+1}.

MTP (eq. 24-25): depth k = 1..D predicts t_{i+k+1} at position i;
L^k = -(1/T) Σ_{i=2+k}^{T+1} log P^k_i[t_i] (a sum over T-k positions, divided by T) and
L_MTP = (λ/D) Σ_k L^k. With nanoseek's 0-based depth k, `mtp_logits[k]` at position i predicts
x_{i+k+2}, so its targets are x[k+2 :].

Sequence-wise balance loss (eq. 17-20), per sequence of T tokens, N_r routed experts, K_r per token:
    f_i  = N_r / (K_r T) · Σ_t 1[ s_{i,t} ∈ Topk({s_{j,t}}, K_r) ]
    s'_{i,t} = s_{i,t} / Σ_j s_{j,t}
    P_i  = (1/T) Σ_t s'_{i,t}
    L_Bal = α Σ_i f_i P_i                       (α = 1e-4; averaged over the batch, summed over MoE layers)
The indicator is the paper's: top-K of the plain affinities s (no bias, no group limit), not the
biased routing the forward pass used; f is a constant, the gradient flows through P only.

Auxiliary-loss-free balancing (§2.1.2): after each optimizer step, for every MoE layer,
    b_i ← b_i + γ · sign(mean_j load_j − load_i)      (γ = 1e-3)
from the measured load (tokens routed to expert i over the whole global batch): overloaded
experts lose γ, underloaded ones gain γ. b only shifts which experts are chosen.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..model.moe import MoE, Routing

V3_LAMBDA_SWITCH = 10.0 / 14.8  # λ = 0.3 for the first 10T of 14.8T tokens, then 0.1 (§4.2)


def next_token_loss(logits: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of logits [B, T, V] against window[:, 1:] (window is [B, T+1])."""
    T = logits.shape[1]
    return F.cross_entropy(logits.float().flatten(0, 1), window[:, 1:T + 1].flatten())


def mtp_loss(mtp_logits: list[torch.Tensor], window: torch.Tensor) -> torch.Tensor:
    """(1/D) Σ_k L^k with L^k = -(1/T) Σ_i log P^k_i[t_i] (eq. 24-25): the sum over the T-k-1
    positions depth k can predict, divided by the full input length T as the paper writes it."""
    if not mtp_logits:
        return window.new_zeros((), dtype=torch.float32)
    B, T = window.shape[0], window.shape[1] - 1
    losses = []
    for k, lg in enumerate(mtp_logits):
        n = lg.shape[1]
        nll = F.cross_entropy(lg.float().flatten(0, 1), window[:, k + 2:k + 2 + n].flatten(), reduction="sum")
        losses.append(nll / (B * T))
    return torch.stack(losses).mean()


def mtp_weight(step: int, total_steps: int, start: float = 0.3, final: float = 0.1) -> float:
    """λ: `start` for the first 10/14.8 of training, then `final` (DeepSeek-V3 §4.2)."""
    return start if step < V3_LAMBDA_SWITCH * total_steps else final


def sequence_balance_loss(scores: torch.Tensor, top_k: int, alpha: float) -> torch.Tensor:
    """α Σ_i f_i P_i for affinities scores [B, T, N_r] (or [T, N_r]), averaged over sequences."""
    if scores.dim() == 2:
        scores = scores[None]
    B, T, n = scores.shape
    chosen = torch.zeros_like(scores).scatter_(-1, scores.detach().topk(top_k, dim=-1).indices, 1.0)
    f = chosen.sum(dim=1) * (n / (top_k * T))                          # [B, N_r]
    P = (scores / scores.sum(dim=-1, keepdim=True)).mean(dim=1)       # [B, N_r]
    return alpha * (f * P).sum(dim=-1).mean()


def moe_layers(model: torch.nn.Module) -> list[MoE]:
    """Every MoE module, main layers first, then the MTP blocks' (the order of the model's routing)."""
    return [m for m in model.modules() if isinstance(m, MoE)]


def balance_loss(routing: list[Routing], top_k: int, alpha: float) -> torch.Tensor | None:
    """Σ over MoE layers of the sequence-wise balance loss of one forward's routing (None: no MoE)."""
    losses = [sequence_balance_loss(r.scores, top_k, alpha) for r in routing]
    return sum(losses[1:], losses[0]) if losses else None


def expert_loads(routing: list[Routing]) -> torch.Tensor:
    """Tokens routed to each expert, [MoE layers, N_r] (float64, on the CPU), from one forward's routing."""
    return torch.stack([r.load.to("cpu", torch.float64) for r in routing])


@torch.no_grad()
def update_bias(moes: list[MoE], loads: torch.Tensor, gamma: float) -> None:
    """b_i += γ · sign(mean load − load_i) for each MoE layer; loads is [layers, N_r]."""
    for m, load in zip(moes, loads):
        b = m.gate.e_score_correction_bias
        if b is not None:
            load = load.to(b.device, torch.float32)
            b.add_(gamma * torch.sign(load.mean() - load))


def load_stats(loads: torch.Tensor) -> list[float]:
    """max/mean load per MoE layer (1.0 = perfectly balanced)."""
    loads = loads.float()
    return (loads.amax(dim=-1) / loads.mean(dim=-1).clamp_min(1e-9)).tolist()


def document_attention_mask(doc: torch.Tensor) -> torch.Tensor:
    """[B, 1, T, T] attention mask (True = may attend) for rows of packed documents: causal, and a token
    sees only the tokens of its own document. `doc` [B, T]: each token's document number in its row."""
    T = doc.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=doc.device).tril()
    return ((doc[:, :, None] == doc[:, None, :]) & causal)[:, None]

