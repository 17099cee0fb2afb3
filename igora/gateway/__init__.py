"""The OpenAI-compatible gateway: ``igora gateway`` (see ``docs/gateway.md``)."""

from __future__ import annotations

from .app import create_app

__all__ = ["create_app"]
