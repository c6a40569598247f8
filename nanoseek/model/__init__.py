"""The model, pure math with no training state: attention.py (MLA naive/absorbed, GQA, RoPE + YaRN),
moe.py (the gate returns weights, indices and the routing), transformer.py (+ MTP), cache.py (the
latent cache of MLA, the K/V cache of GQA).

    from nanoseek.model.transformer import Transformer
    logits = Transformer(preset("tiny"))(input_ids)
"""
