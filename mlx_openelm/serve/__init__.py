"""``mlx-openelm serve``: an OpenAI-compatible server (FastAPI + uvicorn) on the batch engine."""

from .app import ServeConfig, create_app
from .engine import ServedModel
from .schemas import APIError
from .server import BackgroundServer, make_server

__all__ = ["ServeConfig", "create_app", "ServedModel", "APIError", "BackgroundServer", "make_server"]
