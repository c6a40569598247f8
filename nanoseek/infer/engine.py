"""The inference engine: continuous batching over a preallocated KV cache.

    from nanoseek.infer import Engine, SamplingParams
    engine = Engine(model, tok, max_batch_size=32)
    outs = engine.generate(["What is 2+3?", "Name a colour."], SamplingParams(max_tokens=64, temperature=0))
    for delta in engine.stream(["Tell me a story"], SamplingParams(max_tokens=100)):
        print(delta.text, end="", flush=True)

How a step works (`Engine.step`):
  1. admit queued requests into free cache rows and prefill them together (right-padded; the
     padding is never attended: a query at position p sees only positions <= p of its row);
  2. one batched decode step for every running request (or, with speculative decoding, a verify
     step over drafted tokens);
  3. per request: stop tokens, stop strings, max_tokens; a finished request frees its row at once
     (the last row moves into the hole, so running rows stay contiguous and the cache is read as
     views, never gathered).
MLA models cache latents and decode with the weight-absorbed attention (model/attention.py).
A quantized (fp16, bf16, int8, int4) GQA model on CPU caches fp16 keys and values (Engine's kv_cache_dtype).
"""

from __future__ import annotations

import itertools
import logging
import random
from collections import deque
from dataclasses import dataclass, field
from typing import Iterator

import torch

from ..model.cache import KVCache
from . import kernels
from .quantize import MODES, compiles, describe
from .sampling import SamplingParams, apply_penalties, greedy_pick, sample

log = logging.getLogger(__name__)
_said: set[str] = set()  # each decode path is logged once per process


def _compiled(forward):
    """torch.compile of the decode step (optional: minutes of compiling on first use, then fewer,
    fused calls per step). Dynamic shapes: one graph serves every batch size and cache length
    (static shapes per batch and length bucket measured no faster). No guards on the modules'
    attributes: checking them took ~1.5 ms per step; an engine's model does not change its structure
    while it decodes (use_model compiles the new one afresh, in its own cache of graphs).
    cpp_wrapper: inductor calls the graph's kernels from C++ rather than Python, which took the
    transposes and SDPA glue off the step: +10-19% decode tok/s measured (int8 batch 1, AVX-512,
    132/143 -> 158/157 alternated), at the price of a slower first compile (int8 1:22 -> 1:57).
    freezing: the weights become constants of the graph, not ~300 inputs that Python hands to it
    every step (dynamo's "pregraph bytecode" 0.23 -> 0.04 ms of a 5.5 ms int8 step); so an engine
    does not see its model's weights changed in place after the first compiled step (GRPO gives the
    engine a new copy, see use_model)."""
    kernels.available()  # load (or build) the C++ kernel now: doing it inside the trace breaks the graph
    # isolated: without module guards, another engine's graphs (another model) must never be reused here
    return torch.compile(forward, dynamic=True, isolate_recompiles=True,
                         options={"guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe,
                                  "cpp_wrapper": True, "freezing": True})


class QueueFull(RuntimeError):
    """The engine's bounded queue has no room; try again later (HTTP 429)."""


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    logprobs: list[float] | None
    finish_reason: str | None  # "stop" | "length" | "abort"


@dataclass
class Delta:
    """What one request gained in one step (streaming)."""
    request_id: str
    text: str
    token_ids: list[int]
    logprobs: list[float] | None
    finish_reason: str | None = None


@dataclass
class _Request:
    id: str
    prompt: list[int]
    params: SamplingParams
    seed: int
    out: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    text: str = ""
    emitted: int = 0          # characters of `text` already streamed
    prefix_offset: int = 0    # incremental detokenization window
    read_offset: int = 0
    finish_reason: str | None = None

    @property
    def length(self) -> int:
        return len(self.prompt) + len(self.out)


def default_kv_dtype(model) -> torch.dtype:
    """The cache's dtype by default: fp16 keys and values for a quantized GQA model on CPU with the C++
    decode attention, whose fp32 activations lose nothing that matters there (llama.cpp caches fp16
    too) while a batch of 32 at 150 tokens reads as many cache bytes per step as weight bytes; else
    the model's dtype (fp32 decoding stays exact, MLA's latent cache stays as it is)."""
    quantized = any(isinstance(m, tuple(MODES.values())) for m in model.modules())
    if (quantized and not model.config.is_mla and model.dtype == torch.float32 and model.device.type == "cpu"
            and kernels.available()):
        return torch.float16
    return model.dtype


class Engine:
    def __init__(self, model, tokenizer=None, max_batch_size: int = 32, max_seq_len: int | None = None,
                 max_queue: int = 1024, speculative: str | None = None, num_draft: int = 4,
                 ngram_max: int = 3, compile: bool = False, kv_cache_dtype: torch.dtype | None = None):
        self.tok, self._compile = tokenizer, compile
        self.kv_dtype = kv_cache_dtype or default_kv_dtype(model)
        self.use_model(model)
        cfg = model.config
        self.max_batch_size = max_batch_size
        self.max_seq_len = max_seq_len or min(cfg.max_position_embeddings, 4096)
        self.max_queue = max_queue
        if speculative not in (None, "ngram", "mtp"):
            raise ValueError("speculative must be None, 'ngram' or 'mtp'")
        if speculative == "mtp":
            if not len(model.mtp):
                raise ValueError("speculative='mtp' needs a model with MTP modules (num_nextn_predict_layers > 0)")
            num_draft = 1  # one MTP module drafts one token per step (DeepSeek-V3 §2.2, depth 1)
        self.speculative, self.num_draft, self.ngram_max = speculative, num_draft, ngram_max
        self.cache = KVCache.for_model(cfg, max_batch_size, self.max_seq_len + num_draft + 1,
                                       dtype=self.kv_dtype, device=model.device,
                                       num_layers=cfg.num_hidden_layers + len(model.mtp))
        if (model.dtype == torch.float32 and self.cache.a.dtype in (torch.float32, torch.float16)
                and self.cache.a.device.type == "cpu" and kernels.available()):
            self.cache.decode_attention = kernels.decode_attention  # ~2x faster than SDPA for one query per row
        V = cfg.vocab_size
        self.out_counts = torch.zeros(max_batch_size, V, device=model.device)
        self.seen = torch.zeros(max_batch_size, V, dtype=torch.bool, device=model.device)
        self.mtp_draft = torch.zeros(max_batch_size, dtype=torch.long, device=model.device)
        self.running: list[_Request] = []          # row i of the cache belongs to running[i]
        self.queue: deque[_Request] = deque()
        self._ids = itertools.count()
        self.eos_ids = self._eos_ids()
        self.stats = {"steps": 0, "drafted": 0, "accepted": 0, "prefill_tokens": 0, "decode_tokens": 0}

    def use_model(self, model) -> None:
        """Decode with another copy of the same model from now on (GRPO's refreshed fp16 rollout
        copy); the cache, queue and running requests stay."""
        self.model = model.eval()
        if self._compile and not compiles(model):
            log.warning("torch.compile cannot trace w8a8 (fbgemm) layers: decoding eager")
            self._compile = False
        self.path = describe(model, self._compile) + (", torch.compile" if self._compile else ", eager")
        if self.kv_dtype != model.dtype:
            name = {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(self.kv_dtype, str(self.kv_dtype))
            self.path += f", {name} KV cache"
        if self.path not in _said:
            _said.add(self.path)
            log.info("decode path: %s", self.path)
        self._decode_forward = _compiled(model.forward) if self._compile else model.forward

    def _eos_ids(self) -> set[int]:
        eos = self.model.config.eos_token_id
        ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if self.tok is not None and self.tok.eos_token_id is not None:
            ids.add(self.tok.eos_token_id)
        return ids

    # -- requests ---------------------------------------------------------------------------------
    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None,
                    request_id: str | None = None) -> str:
        """Queue a request; raises QueueFull when the bounded queue is full."""
        return self._add(prompt, params, request_id).id

    def _add(self, prompt, params=None, request_id=None) -> _Request:
        params = params or SamplingParams()
        ids = self.tok.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise ValueError("the prompt is empty")
        if len(ids) >= self.max_seq_len:
            raise ValueError(f"prompt of {len(ids)} tokens does not fit max_seq_len={self.max_seq_len}")
        if len(self.queue) >= self.max_queue:
            raise QueueFull(f"queue full ({self.max_queue} waiting)")
        rid = request_id or f"req-{next(self._ids)}"
        seed = params.seed if params.seed is not None else random.getrandbits(31)
        req = _Request(rid, ids, params, seed)
        self.queue.append(req)
        return req

    def abort(self, request_id: str) -> None:
        for r in list(self.queue):
            if r.id == request_id:
                self.queue.remove(r)
        for i, r in enumerate(self.running):
            if r.id == request_id:
                r.finish_reason = "abort"
                self._free(i)
                return

    def has_work(self) -> bool:
        return bool(self.queue or self.running)

    # -- one engine step ----------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> list[Delta]:
        deltas: list[Delta] = []
        decoding = list(self.running)
        if decoding:
            plain_greedy = all(r.params.greedy and not r.params.penalized for r in decoding)
            if self.speculative == "mtp" and plain_greedy:
                self._mtp_step(decoding, deltas)
            elif self.speculative and plain_greedy:
                self._speculative_step(decoding, deltas)
            else:
                self._decode_step(decoding, deltas)
        admitted = []
        while self.queue and len(self.running) + len(admitted) < self.max_batch_size:
            admitted.append(self.queue.popleft())
        if admitted:
            self._prefill(admitted, deltas)
        self.stats["steps"] += 1
        return deltas

    def _prefill(self, reqs: list[_Request], deltas: list[Delta]):
        start = len(self.running)
        self.running.extend(reqs)
        n, T = len(reqs), max(len(r.prompt) for r in reqs)
        dev = self.model.device
        ids = torch.zeros(n, T, dtype=torch.long, device=dev)
        for i, r in enumerate(reqs):
            ids[i, : len(r.prompt)] = torch.tensor(r.prompt, device=dev)
        rows = slice(start, start + n)
        self.out_counts[rows] = 0
        self.seen[rows] = False
        for i, r in enumerate(reqs):
            self.seen[start + i, ids[i, : len(r.prompt)]] = True
        positions = torch.arange(T, device=dev).expand(n, T)
        h = self.model.hidden_states(ids, positions, cache=self.cache.rows(start, start + n))
        last = torch.tensor([len(r.prompt) - 1 for r in reqs], device=dev)
        h_last = h[torch.arange(n, device=dev), last]
        self.stats["prefill_tokens"] += sum(len(r.prompt) for r in reqs)
        logits = self.model.lm_head(h_last).float()
        if self.speculative == "mtp":
            # MTP reads (h_i, token i+1) at every prompt position; the last one uses the greedy guess
            nxt = torch.cat([ids[:, 1:], ids[:, :1]], dim=1)
            nxt[torch.arange(n, device=dev), last] = logits.argmax(-1)
            self.mtp_draft[start:start + n] = self._mtp_draft(h, nxt, positions, self.cache.rows(start, start + n), last)
        self._sample_and_emit(reqs, start, logits, deltas)

    def _decode_step(self, reqs: list[_Request], deltas: list[Delta]):
        n, dev = len(reqs), self.model.device
        ids = torch.tensor([[r.out[-1]] for r in reqs], device=dev)
        positions = torch.tensor([[r.length - 1] for r in reqs], device=dev)
        logits = self._decode_forward(ids, positions=positions, cache=self.cache.rows(0, n).prepare(positions))[:, 0].float()
        self.stats["decode_tokens"] += n
        self._sample_and_emit(reqs, 0, logits, deltas)

    def _sample_and_emit(self, reqs, start, logits, deltas):
        n, dev = len(reqs), logits.device
        rows = slice(start, start + n)
        P = [r.params for r in reqs]
        f = lambda vals: torch.tensor(vals, device=dev, dtype=torch.float32)  # noqa: E731
        # a row's counts are reset when its request is admitted and read only by its own penalties, so a
        # batch without penalties skips them, and an all-greedy one the sampler's parameter tensors:
        # ~0.1 ms of a step's host time (a quarter of it at batch 1)
        penalized = any(p.penalized for p in P)
        if penalized:
            logits = apply_penalties(logits, self.out_counts[rows], self.seen[rows],
                                     f([p.repetition_penalty for p in P]), f([p.presence_penalty for p in P]),
                                     f([p.frequency_penalty for p in P]))
        if all(p.greedy for p in P):
            nxt = greedy_pick(logits)
        else:
            nxt = sample(logits, f([p.temperature for p in P]), torch.tensor([p.top_k for p in P], device=dev),
                         f([p.top_p for p in P]), f([p.min_p for p in P]),
                         torch.tensor([r.seed for r in reqs], device=dev),
                         torch.tensor([len(r.out) for r in reqs], device=dev))
        lp = None
        if any(p.logprobs for p in P):
            lp = logits.log_softmax(dim=-1).gather(1, nxt[:, None])[:, 0].tolist()
        if penalized:
            self.out_counts[rows].scatter_add_(1, nxt[:, None], torch.ones(n, 1, device=dev))
            self.seen[rows].scatter_(1, nxt[:, None], True)
        self._emit(reqs, [[t] for t in nxt.tolist()], [[x] for x in lp] if lp else None, deltas)

    # -- speculative decoding (greedy rows only) ----------------------------------------------------
    def _draft(self, r: _Request) -> list[int]:
        """Prompt lookup: the tokens that followed the latest earlier occurrence of the last n-gram."""
        seq = r.prompt + r.out
        k = self.num_draft
        for n in range(min(self.ngram_max, len(seq) - 1), 0, -1):
            tail = seq[-n:]
            for i in range(len(seq) - n - 1, max(-1, len(seq) - n - 2048), -1):
                if seq[i:i + n] == tail:
                    follow = seq[i + n: i + n + k]
                    if follow:
                        return (follow + [follow[-1]] * k)[:k]
        return [seq[-1]] * k

    def _speculative_step(self, reqs: list[_Request], deltas: list[Delta]):
        n, k, dev = len(reqs), self.num_draft, self.model.device
        drafts = [self._draft(r) for r in reqs]
        ids = torch.tensor([[r.out[-1]] + d for r, d in zip(reqs, drafts)], device=dev)
        positions = torch.tensor([r.length - 1 for r in reqs], device=dev)[:, None] + torch.arange(k + 1, device=dev)
        logits = self.model(ids, positions=positions, cache=self.cache.rows(0, n)).float()
        target = logits.argmax(dim=-1)                                  # [n, k+1]
        match = (target[:, :-1] == ids[:, 1:]).int().cumprod(dim=-1)   # accepted draft prefix
        accepted = match.sum(dim=-1).tolist()
        target = target.tolist()
        new = [target[i][: a + 1] for i, a in enumerate(accepted)]
        lps = None
        if any(r.params.logprobs for r in reqs):
            lsm = logits.log_softmax(dim=-1)
            lps = [lsm[i, torch.arange(len(t)), torch.tensor(t)].tolist() for i, t in enumerate(new)]
        self.stats["drafted"] += n * k
        self.stats["accepted"] += sum(accepted)
        self.stats["decode_tokens"] += n * (k + 1)
        self._emit(reqs, new, lps, deltas)  # plain greedy rows: no penalty counts to keep

    def _mtp_draft(self, h, next_ids, positions, cache, pick):
        """Greedy MTP proposal for the token after next, read at index `pick` of each row."""
        module = self.model.mtp[0]
        cos, sin = self.model.rotary(positions, h.dtype)
        out, _ = module(h, self.model.model.embed_tokens(next_ids), cos, sin, positions, cache)
        sel = out[torch.arange(out.shape[0], device=out.device), pick]
        return self.model.lm_head(module.shared_head.norm(sel)).argmax(dim=-1)

    def _mtp_step(self, reqs: list[_Request], deltas: list[Delta]):
        """Verify [last token, MTP draft] in one forward; keep 1 or 2 tokens; draft the next one."""
        n, dev = len(reqs), self.model.device
        draft = self.mtp_draft[:n]
        ids = torch.stack([torch.tensor([r.out[-1] for r in reqs], device=dev), draft], dim=1)
        positions = torch.tensor([r.length - 1 for r in reqs], device=dev)[:, None] + torch.arange(2, device=dev)
        cache = self.cache.rows(0, n)
        h = self.model.hidden_states(ids, positions, cache)
        logits = self.model.lm_head(h).float()
        target = logits.argmax(dim=-1)                     # [n, 2]
        accepted = target[:, 0] == draft
        self.mtp_draft[:n] = self._mtp_draft(h, target, positions, cache, accepted.long())
        acc = accepted.tolist()
        target = target.tolist()
        new = [t if a else t[:1] for t, a in zip(target, acc)]
        lps = None
        if any(r.params.logprobs for r in reqs):
            lsm = logits.log_softmax(dim=-1)
            lps = [lsm[i, torch.arange(len(t)), torch.tensor(t)].tolist() for i, t in enumerate(new)]
        self.stats["drafted"] += n
        self.stats["accepted"] += sum(acc)
        self.stats["decode_tokens"] += 2 * n
        self._emit(reqs, new, lps, deltas)

    # -- bookkeeping ------------------------------------------------------------------------------
    def _emit(self, reqs, new_tokens, new_logprobs, deltas):
        finished = []
        for i, r in enumerate(reqs):
            p, got, got_lp = r.params, [], []
            for j, t in enumerate(new_tokens[i]):
                if (t in self.eos_ids and not p.ignore_eos) or t in p.stop_token_ids:
                    r.finish_reason = "stop"  # the stop token itself is not part of the output
                    break
                r.out.append(t)
                got.append(t)
                if new_logprobs:
                    got_lp.append(new_logprobs[i][j])
                if len(r.out) >= p.max_tokens or r.length >= self.max_seq_len:
                    r.finish_reason = "length"
                    break
            r.logprobs.extend(got_lp)
            self._detok(r, final=r.finish_reason is not None)
            if p.stop:
                self._cut_at_stop_string(r)
            deltas.append(Delta(r.id, self._pending_text(r), got, got_lp if p.logprobs else None, r.finish_reason))
            if r.finish_reason:
                finished.append(r)
        for r in finished:
            self._free(self.running.index(r))

    def _detok(self, r: _Request, final: bool = False):
        """Append newly decodable text; hold back an incomplete UTF-8 sequence unless final."""
        if self.tok is None or r.read_offset == len(r.out):
            return
        prev = self.tok.decode(r.out[r.prefix_offset:r.read_offset])
        cur = self.tok.decode(r.out[r.prefix_offset:])
        if len(cur) > len(prev) and (final or not cur.endswith("\ufffd")):
            r.text += cur[len(prev):]
            r.prefix_offset, r.read_offset = r.read_offset, len(r.out)

    def _cut_at_stop_string(self, r: _Request):
        """Cut the text at the first stop string (which is not part of the output) and finish."""
        lo = max(0, r.emitted - max(map(len, r.params.stop)))
        hits = [h for h in (r.text.find(s, lo) for s in r.params.stop) if h >= 0]
        if hits:
            r.text = r.text[: min(hits)]
            r.finish_reason = "stop"

    def _pending_text(self, r: _Request) -> str:
        """Text not yet streamed; while running, hold back what could still start a stop string."""
        end = len(r.text)
        if not r.finish_reason and r.params.stop:
            hold = max(map(len, r.params.stop)) - 1
            end = max(r.emitted, end - hold)
        out = r.text[r.emitted:end]
        r.emitted = end
        return out

    def _free(self, i: int):
        """Release row i: the last running row moves into it."""
        last = len(self.running) - 1
        if i != last:
            moved = self.running[last]
            self.cache.copy_row(last, i, moved.length)
            self.out_counts[i] = self.out_counts[last]
            self.seen[i] = self.seen[last]
            self.mtp_draft[i] = self.mtp_draft[last]
            self.running[i] = moved
        self.running.pop()

    # -- convenience ------------------------------------------------------------------------------
    def generate(self, prompts: list[str | list[int]], params: SamplingParams | list[SamplingParams] | None = None,
                 progress: bool = False) -> list[RequestOutput]:
        """Run prompts to completion; the running batch fills up to max_batch_size."""
        plist = params if isinstance(params, list) else [params or SamplingParams()] * len(prompts)
        pending = deque(zip(prompts, plist))
        reqs = []
        bar = None
        if progress:
            from tqdm import tqdm
            bar = tqdm(total=len(prompts), desc="generate", unit="req")
        while pending or self.has_work():
            while pending and len(self.queue) < self.max_queue:
                reqs.append(self._add(*pending.popleft()))
            for d in self.step():
                if d.finish_reason and bar:
                    bar.update(1)
        if bar:
            bar.close()
        return [self._output(r) for r in reqs]

    def stream(self, prompts: list[str | list[int]], params: SamplingParams | None = None) -> Iterator[Delta]:
        ids = [self.add_request(prompt, params) for prompt in prompts]
        try:
            while self.has_work():
                yield from self.step()
        finally:   # a consumer that stops early (Ctrl-C, a closed generator) frees its requests' rows
            for rid in ids:
                self.abort(rid)

    @staticmethod
    def _output(r: _Request) -> RequestOutput:
        return RequestOutput(r.id, r.prompt, r.out, r.text, r.logprobs if r.params.logprobs else None,
                             r.finish_reason)

    @property
    def acceptance_rate(self) -> float:
        return self.stats["accepted"] / self.stats["drafted"] if self.stats["drafted"] else 0.0
