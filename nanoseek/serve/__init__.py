"""The OpenAI-compatible server: `nanoseek serve --model DIR` (or `python -m nanoseek.serve --model DIR`).

    nanoseek serve --model runs/distill/final --port 8000 --max-batch 32 --reasoning-budget 512
    curl -s localhost:8000/v1/chat/completions -d '{"messages": [{"role": "user", "content": "2+3?"}]}'
    open http://127.0.0.1:8000/                     # the web chat page

Modules: `worker` (the engine thread), `protocol` (request validation, OpenAI errors),
`app` (FastAPI endpoints, SSE), `guard` (Host check, concurrency limit, read timeouts),
`metrics` (Prometheus text), `cli` (flags, uvicorn, SIGTERM drain),
`static/` (the chat page: plain HTML/CSS/JS, no build step). fastapi is imported lazily, so the
rest of nanoseek works without it.
"""


def create_app(*args, **kwargs):
    """See nanoseek.serve.app.create_app."""
    from .app import create_app as _create_app
    return _create_app(*args, **kwargs)
