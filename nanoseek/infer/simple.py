"""Simple decoding: prefill once, then one batched step per new token over the KV cache.

The reference the fast engine is checked against.

    ids = generate(model, [tok.encode(prompt)], max_new_tokens=32)[0]            # greedy
    ids = generate(model, prompts, max_new_tokens=32, temperature=0.7, seed=0)
"""

from __future__ import annotations

import torch

from ..model.cache import KVCache


@torch.inference_mode()
def generate(model, prompts: list[list[int]], max_new_tokens: int = 32, temperature: float = 0.0,
             eos_token_id: int | list[int] | None = None, seed: int | None = None) -> list[list[int]]:
    """New token ids for each prompt (prompts may differ in length; rows stop at EOS)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    device, B = model.device, len(prompts)
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    T = int(lengths.max())
    cfg = model.config
    cache = KVCache.for_model(cfg, B, T + max_new_tokens, dtype=model.dtype, device=device,
                              num_layers=cfg.num_hidden_layers)
    ids = torch.zeros(B, T, dtype=torch.long, device=device)
    for i, p in enumerate(prompts):  # right-padded; padding is overwritten before it is attended
        ids[i, : len(p)] = torch.tensor(p, device=device)
    gen = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    eos = torch.tensor([eos_token_id] if isinstance(eos_token_id, int) else (eos_token_id or []), device=device)

    logits = model(ids, positions=torch.arange(T, device=device).expand(B, T), cache=cache)
    last = logits[torch.arange(B, device=device), lengths - 1]
    out = torch.zeros(B, max_new_tokens, dtype=torch.long, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    pos = lengths.clone()
    n = 0
    for n in range(max_new_tokens):
        if temperature > 0:
            probs = torch.softmax(last.float() / temperature, dim=-1)
            nxt = torch.multinomial(probs, 1, generator=gen)[:, 0]
        else:
            nxt = last.argmax(dim=-1)
        out[:, n] = nxt
        done |= torch.isin(nxt, eos)
        if bool(done.all()) or n == max_new_tokens - 1:
            break
        last = model(nxt[:, None], positions=pos[:, None], cache=cache)[:, 0]
        pos += 1
    result = []
    for row in out[:, : n + 1].tolist():
        cut = next((i + 1 for i, t in enumerate(row) if t in eos.tolist()), len(row))
        result.append(row[:cut])
    return result
