"""Engines behind one interface (``base.Engine``): llama.cpp, OpenAI-compatible upstream,
and a deterministic echo engine for tests and benchmarks."""

from __future__ import annotations

from .base import Engine, EngineError, EngineUnavailable, Finish, ModelInfo, Request

__all__ = ["Engine", "EngineError", "EngineUnavailable", "Finish", "ModelInfo", "Request"]
