"""The Transformer: decoder blocks, the LM head and DeepSeek-V3's multi-token-prediction modules.

Module names follow Hugging Face (`model.embed_tokens`, `model.layers.N.self_attn.*`,
`model.layers.N.mlp.*`, `model.norm`, `lm_head`), so a state dict saved from here is what
transformers, vLLM and SGLang load. MTP modules live in `mtp.K.*` and are written to disk as
DeepSeek does, as `model.layers.{num_hidden_layers + K}.*` (see weights/hf.py).

MTP (DeepSeek-V3 §2.2), depth k = 1..D, at position i:
  h^k_i = Block_k( eh_proj[ enorm(Emb(t_{i+k})) ; hnorm(h^{k-1}_i) ] )      predicts t_{i+k+1}
with the embedding and output head shared with the main model, h^0 the main model's output.

    model = Transformer(preset("tiny"))
    logits = model(input_ids)                              # [B, T, vocab]
    logits, mtp_logits = model(input_ids, return_mtp=True)  # mtp_logits[k]: [B, T-k-1, vocab]
    logits, mtp_logits, routing = model(input_ids, return_mtp=True, return_routing=True)  # training
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import ModelConfig
from .attention import GQA, MLA, RMSNorm, RotaryEmbedding
from .cpu_kernels import Linear
from .moe import MLP, Experts, MoE


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, moe: bool):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = (MLA if cfg.is_mla else GQA)(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MoE(cfg) if moe else MLP(cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias)
        self.is_moe = moe

    def forward(self, x, cos, sin, positions, cache=None, mask=None):
        """-> (x, the MoE's Routing, or None in a dense layer)."""
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, positions, cache, mask)
        y, routing = self.mlp(self.post_attention_layernorm(x)) if self.is_moe else (
            self.mlp(self.post_attention_layernorm(x)), None)
        return x + y, routing


class Decoder(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i, cfg.is_moe_layer(i)) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class SharedHead(nn.Module):
    """The MTP module's own final norm; the projection itself is the main lm_head."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class MTPModule(nn.Module):
    def __init__(self, cfg: ModelConfig, depth: int):
        super().__init__()
        self.enorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.hnorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.eh_proj = Linear(2 * cfg.hidden_size, cfg.hidden_size, bias=False)
        layer_idx = cfg.num_hidden_layers + depth  # its own cache slot, after the main layers
        self.block = Block(cfg, layer_idx, cfg.is_moe_layer(layer_idx))
        self.shared_head = SharedHead(cfg)

    def forward(self, h, emb, cos, sin, positions, cache=None, mask=None):
        """-> (h, Routing or None), as Block."""
        x = self.eh_proj(torch.cat((self.enorm(emb), self.hnorm(h)), dim=-1))
        return self.block(x, cos, sin, positions, cache, mask)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = Decoder(cfg)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.mtp = nn.ModuleList(MTPModule(cfg, k) for k in range(cfg.num_nextn_predict_layers))
        self.rotary = RotaryEmbedding(cfg)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module, std: float = 0.02):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            if m.weight.device.type != "meta":
                nn.init.normal_(m.weight, std=std)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
        elif isinstance(m, Experts):
            for w in (m.gate_up_proj, m.down_proj):
                if w.device.type != "meta":
                    nn.init.normal_(w, std=std)
        elif hasattr(m, "weight") and isinstance(m.weight, nn.Parameter) and m.weight.device.type != "meta":
            if isinstance(m, RMSNorm):
                nn.init.ones_(m.weight)
            else:  # the MoE gate
                nn.init.normal_(m.weight, std=std)

    def _positions(self, input_ids, positions):
        B, T = input_ids.shape
        if positions is None:
            return torch.arange(T, device=input_ids.device).expand(B, T)
        return positions.expand(B, T) if positions.dim() == 1 else positions

    def hidden_states(self, input_ids, positions=None, cache=None, mask=None, routing: list | None = None):
        """Final-normed hidden states [B, T, H] (what the LM head and the first MTP module read).
        `cache`: a KV cache to read and fill (inference). `mask` [B, 1, T, T] (True = may attend), for a
        training forward with no cache: e.g. several sequences sharing a prompt packed in one row.
        `routing`: a list that receives each MoE layer's Routing, in order."""
        positions = self._positions(input_ids, positions)
        x = self.model.embed_tokens(input_ids)
        cos, sin = self.rotary(positions, x.dtype)
        for layer in self.model.layers:
            x, r = layer(x, cos, sin, positions, cache, mask)
            if routing is not None and r is not None:
                routing.append(r)
        return self.model.norm(x)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None,
                cache=None, return_mtp: bool = False, return_routing: bool = False, mask=None):
        """logits [B, T, V]; with return_mtp also the MTP logits of each depth; with return_routing
        also every MoE layer's Routing (main layers, then the MTP blocks'), for the training objective."""
        routing = [] if return_routing else None
        h = self.hidden_states(input_ids, positions, cache, mask, routing=routing)
        out = (self.lm_head(h),)
        if return_mtp:
            out += (self.mtp_logits(input_ids, h, self._positions(input_ids, positions), routing, mask),)
        if return_routing:
            out += (routing,)
        return out[0] if len(out) == 1 else out

    def mtp_logits(self, input_ids, h, positions, routing: list | None = None, mask=None):
        """Logits of each MTP depth k (0-based): position i predicts token i + k + 2."""
        out = []
        for k, module in enumerate(self.mtp):
            T = h.shape[1] - 1
            if T <= 0:
                break
            emb = self.model.embed_tokens(input_ids[:, k + 1: k + 1 + T])
            pos = positions[:, :T]
            cos, sin = self.rotary(pos, h.dtype)
            h, r = module(h[:, :T], emb, cos, sin, pos, mask=None if mask is None else mask[..., :T, :T])
            if routing is not None and r is not None:
                routing.append(r)
            out.append(self.lm_head(module.shared_head.norm(h)))
        return out

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype
