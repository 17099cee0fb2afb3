"""The OpenAI-compatible gateway: ``igora gateway`` (see ``docs/gateway.md``)."""

from __future__ import annotations

from typing import Any

__all__ = ["create_app"]


def __getattr__(name: str) -> Any:
    if name == "create_app":  # imported on use: FastAPI takes a second to import
        from .app import create_app

        return create_app
    raise AttributeError(name)
