"""HTTP serving of text generation (FastAPI + uvicorn)."""

from gigatron.core.inference.server.validation import RequestError, ServerDefaults

__all__ = ["RequestError", "ServerDefaults", "build_app", "serve"]


def build_app(*args, **kwargs):
    from gigatron.core.inference.server.app import build_app as _build
    return _build(*args, **kwargs)


def serve(*args, **kwargs):
    from gigatron.core.inference.server.app import serve as _serve
    return _serve(*args, **kwargs)
