"""Serving a K2 model: loading a model directory, and an OpenAI-compatible HTTP server over k2.sample.

    from k2 import serve
    model, tokenizer = serve.load('WORKDIR/model')
    app = serve.create_app(model, tokenizer, model_name='k2')     # uvicorn.run(app, ...); experiments/serve.py

`loading` (model directory -> model and tokenizer, shared with experiments/chat.py), `protocol` (OpenAI request
and response shapes <-> k2.chat), `app` (the FastAPI routes).
"""

from k2.serve.app import create_app
from k2.serve.loading import load

__all__ = ['create_app', 'load']
