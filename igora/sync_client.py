"""``SyncClient``: the Client for code without ``async``, on a loop of its own thread."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .client import Client


class SyncClient:
    """The Client for code without ``async``: ``SyncClient().chat("Bonjour")``."""

    def __init__(self, market: str | None = None, room: str | None = None, **kw: Any) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, daemon=True, name="igora-client"
        )
        self._thread.start()
        self._client: Client = self._call(self._make(market, room, kw))
        try:
            self._call(self._client.connect())
        except BaseException:
            self._stop_loop()
            raise

    async def _make(self, market: str | None, room: str | None, kw: dict[str, Any]) -> Client:
        from .client import Client  # here: client.py re-exports this module's class

        return Client(market, room, **kw)

    def _call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def __enter__(self) -> SyncClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._loop.is_running():
            with contextlib.suppress(Exception):
                self._call(self._client.close())
            self._stop_loop()

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    def models(self) -> list[str]:
        return self._client.models()

    def embed(self, inputs: str | list[str], **options: Any) -> list[list[float]]:
        return self._call(self._client.embed(inputs, **options))  # type: ignore[no-any-return]

    def chat(
        self, prompt: str | list[dict[str, str]], *, stream: bool = False, **options: Any
    ) -> Any:
        if not stream:
            return self._call(self._client.chat(prompt, **options))
        return self._iterate(prompt, options)

    def _iterate(self, prompt: Any, options: dict[str, Any]) -> Iterator[str]:
        agen = self._call(self._client.chat(prompt, stream=True, **options))
        try:
            while True:
                try:
                    yield self._call(agen.__anext__())
                except StopAsyncIteration:
                    return
        finally:
            with contextlib.suppress(Exception):
                self._call(agen.aclose())
