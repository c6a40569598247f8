"""OpenAI request bodies -> validated generation requests, and OpenAI-shaped errors.

    req = parse_chat(json_body, served_model="m")        # raises ApiError(400, ..., param="temperature")
    req.messages, req.params (SamplingParams fields), req.max_tokens, req.n, req.stream, req.budget

Validation is written out by hand rather than with pydantic models so that every rejection
names its field (`param`) the way OpenAI does, bools are never taken for numbers, and nothing a
client sends can reach the engine as a value it would crash on (token ids outside the vocabulary,
seeds outside int64, NaN temperatures). Unknown fields are ignored; known ones we cannot honour
(tools, logit_bias, top_logprobs > 0, suffix, JSON mode) are refused with a 400.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

INT64 = 2**63
MAX_N = 16
# Below this, logits / T overflow float32 and sampling degenerates (1e-40 gave EOS every time);
# vLLM treats temperatures under the same epsilon (_SAMPLING_EPS = 1e-5) as greedy.
MIN_TEMPERATURE = 1e-5
ROLES = {"system", "developer", "user", "assistant"}


class ApiError(Exception):
    """An error response: {"error": {"message", "type", "param", "code"}} with an HTTP status."""
    TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
             404: "not_found_error",
             405: "invalid_request_error", 408: "invalid_request_error", 413: "invalid_request_error",
             421: "invalid_request_error", 429: "rate_limit_error",
             500: "server_error", 503: "service_unavailable"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "server_error"),
                          "param": self.param, "code": self.code}}


def bad(param: str, message: str) -> ApiError:
    return ApiError(400, message, param=param, code="invalid_value")


# -- field readers: each returns the default for a missing or null field -------------------------
def _int(body, name, default=None, lo=None, hi=None):
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, float) and v.is_integer() and abs(v) < INT64:
        v = int(v)
    if not isinstance(v, int) or isinstance(v, bool):
        raise bad(name, f"'{name}' must be an integer")
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise bad(name, f"'{name}' must be {_range(lo, hi)}, got {str(v)[:24]}")
    return v


def _float(body, name, default=None, lo=None, hi=None):
    v = body.get(name)
    if v is None:
        return default
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(min(abs(v), 1e300)):
        raise bad(name, f"'{name}' must be a number")
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise bad(name, f"'{name}' must be {_range(lo, hi)}, got {str(v)[:24]}")
    return float(v)


def _bool(body, name, default=False):
    v = body.get(name)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise bad(name, f"'{name}' must be a boolean")
    return v


def _range(lo, hi):
    return f"between {lo} and {hi}" if lo is not None and hi is not None else f">= {lo}" if lo is not None else f"<= {hi}"


def _stop(body) -> list[str]:
    v = body.get("stop")
    if v is None:
        return []
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list) or len(v) > 16 or not all(isinstance(s, str) for s in v):
        raise bad("stop", "'stop' must be a string or a list of at most 16 strings")
    return [s for s in v if s]


def _refuse_unsupported(body):
    if body.get("tools") or body.get("functions"):
        raise bad("tools", "tool calling is not supported by this server")
    if body.get("logit_bias"):
        raise bad("logit_bias", "'logit_bias' is not supported")
    rf = body.get("response_format")
    if rf is not None and not (isinstance(rf, dict) and rf.get("type") == "text"):
        raise bad("response_format", "only response_format {'type': 'text'} is supported")


@dataclass
class GenRequest:
    """What the server needs from either endpoint."""
    model: str | None
    params: dict                             # SamplingParams fields except max_tokens
    max_tokens: int | None                   # as the client asked; None: not given
    default_max_tokens: int | None           # when not given (None: as many as the context allows)
    n: int
    stream: bool
    include_usage: bool
    logprobs: bool
    budget: int | None
    messages: list[dict] | None = None       # chat
    prompts: list | None = None              # completions: strings or token-id lists
    echo: bool = False


def _common(body: dict, served_model: str, default_budget: int | None, max_tokens_default: int | None,
            max_tokens_names=("max_tokens",), max_tokens_cap: int | None = None) -> dict:
    """The fields both endpoints share."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object", code="invalid_json")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise bad("model", "'model' must be a string")
    if model is not None and model != served_model:
        raise ApiError(404, f"the model '{model}' does not exist; this server serves '{served_model}'",
                       param="model", code="model_not_found")
    _refuse_unsupported(body)
    max_tokens = None
    for name in max_tokens_names:
        max_tokens = _int(body, name, max_tokens, lo=1)
        if max_tokens_cap is not None and max_tokens is not None and max_tokens > max_tokens_cap:
            raise bad(name, f"'{name}' is {str(max_tokens)[:24]}, more than this server's limit of "
                            f"{max_tokens_cap} tokens (--max-tokens)")
    temperature = _float(body, "temperature", 1.0, 0, 2)
    if temperature < MIN_TEMPERATURE:
        temperature = 0.0
    top_p = _float(body, "top_p", 1.0, 0, 1)
    if top_p == 0:                      # OpenAI accepts 0: only the most likely token survives
        temperature, top_p = 0.0, 1.0
    top_k = _int(body, "top_k", 0, -1, 1 << 20)
    seed = _int(body, "seed", None, -INT64, INT64 - 1)
    stream_options = body.get("stream_options")
    if stream_options is not None and not isinstance(stream_options, dict):
        raise bad("stream_options", "'stream_options' must be an object")
    budget = _int(body, "reasoning_budget", None, lo=0)
    budget = _int(body, "thinking_budget", budget, lo=0)
    params = dict(
        temperature=temperature, top_p=top_p, top_k=max(top_k, 0),
        min_p=_float(body, "min_p", 0.0, 0, 1),
        presence_penalty=_float(body, "presence_penalty", 0.0, -2, 2),
        frequency_penalty=_float(body, "frequency_penalty", 0.0, -2, 2),
        repetition_penalty=_float(body, "repetition_penalty", 1.0, 0.01, 100),
        stop=_stop(body), seed=seed & (INT64 - 1) if seed is not None else None,
    )
    return dict(model=model, params=params, max_tokens=max_tokens, default_max_tokens=max_tokens_default,
                n=_int(body, "n", 1, 1, MAX_N), stream=_bool(body, "stream"),
                include_usage=_bool(stream_options or {}, "include_usage") if stream_options else False,
                budget=budget if budget is not None else default_budget)


def parse_chat(body, served_model: str, default_budget: int | None = None,
               max_tokens_cap: int | None = None) -> GenRequest:
    c = _common(body, served_model, default_budget, None, ("max_tokens", "max_completion_tokens"), max_tokens_cap)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad("messages", "'messages' must be a non-empty list of {role, content} objects")
    clean = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise bad(f"messages[{i}]", f"messages[{i}] must be an object")
        role = m.get("role")
        if not isinstance(role, str) or role not in ROLES:  # a dict role is unhashable
            raise bad(f"messages[{i}].role", f"messages[{i}].role must be one of {sorted(ROLES)}")
        clean.append({"role": "system" if role == "developer" else role,
                      "content": _content(m.get("content"), f"messages[{i}].content")})
    if _int(body, "top_logprobs", 0, 0, 20):
        raise bad("top_logprobs", "'top_logprobs' > 0 is not supported (only the sampled token's logprob)")
    return GenRequest(messages=clean, logprobs=_bool(body, "logprobs"), **c)


def _content(v, param) -> str:
    """A message content: a string, null, or a list of {"type": "text", "text": ...} parts."""
    if v is None:
        return ""
    if isinstance(v, str):
        return v
    if isinstance(v, list):
        texts = []
        for p in v:
            if not (isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)):
                raise bad(param, f"{param}: only text content parts are supported")
            texts.append(p["text"])
        return "".join(texts)
    raise bad(param, f"{param} must be a string or a list of text parts")


def parse_completion(body, served_model: str, vocab_size: int, max_tokens_cap: int | None = None) -> GenRequest:
    c = _common(body, served_model, None, 16, max_tokens_cap=max_tokens_cap)
    c["budget"] = None
    prompt = body.get("prompt") if isinstance(body, dict) else None
    if isinstance(prompt, str):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        prompts = prompt
    elif isinstance(prompt, list) and prompt and all(_is_int(t) for t in prompt):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, list) and p and all(_is_int(t) for t in p)
                                                     for p in prompt):
        prompts = prompt
    else:
        raise bad("prompt", "'prompt' must be a string, a list of strings, or token ids (a list of "
                            "integers or a list of such lists)")
    if len(prompts) * c["n"] > MAX_N:
        raise bad("prompt", f"at most {MAX_N} completions (prompts x n) per request")
    for p in prompts:
        if isinstance(p, list) and not all(0 <= t < vocab_size for t in p):
            raise bad("prompt", f"token ids must be in [0, {vocab_size})")
    if body.get("suffix"):
        raise bad("suffix", "'suffix' is not supported")
    best_of = _int(body, "best_of", None, 1, MAX_N)
    if best_of is not None and best_of != c["n"]:
        raise bad("best_of", "'best_of' other than n is not supported")
    lp = _int(body, "logprobs", None, 0, 5)
    return GenRequest(prompts=prompts, logprobs=lp is not None, echo=_bool(body, "echo"), **c)


def _is_int(t) -> bool:
    return isinstance(t, int) and not isinstance(t, bool)
