"""A deliberately misbehaving OpenAI-compatible upstream, for fault-injection tests.

The model a request names picks the behaviour:

- ``ok``: streams ``Hello from the stub`` in four pieces (``max_tokens`` cuts it and
  ends with ``length``), with a usage chunk when ``stream_options.include_usage`` asks;
- ``slow``: streams ``tok0 tok1 ...`` every 50 ms for a minute (aborts are counted);
- ``hang``: never answers;
- ``cut``: three pieces, then the socket is closed in the middle of the chunked body;
- ``cut-clean``: three pieces, then a well-formed end of body without ``[DONE]``;
- ``interrupted``: three pieces, then ``[DONE]`` with no finish reason (what
  llama-cpp-python's server sends when another request interrupts a stream);
- ``midstream-error``: one piece, then an ``{"error": ...}`` chunk;
- ``json``: a whole (non-streaming) chat.completion even though a stream was asked;
- ``e400``, ``e401``, ``e404``, ``e429``, ``e500``, ``e503``: that HTTP status with an
  OpenAI-style error body.

``Stub(strict_options=True)`` rejects ``stream_options`` (like some older servers);
``Stub(api_key="k")`` answers 401 to requests without ``Authorization: Bearer k``.
Run alone: ``python -m tests.upstream_stub --port 8011``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

MODES = [
    "ok",
    "slow",
    "hang",
    "cut",
    "cut-clean",
    "interrupted",
    "midstream-error",
    "json",
    "e400",
    "e401",
    "e404",
    "e429",
    "e500",
    "e503",
]
OK_PIECES = ["Hello", " from", " the", " stub"]
ERRORS = {
    400: "stub: the request is invalid (e400)",
    401: "Incorrect API key provided",
    404: "stub: no such model",
    429: "stub: rate limit reached, slow down",
    500: "stub: internal failure while generating",
    503: "stub: overloaded, try again later",
}


class Stub:
    """The upstream, served from threads of the current process on 127.0.0.1."""

    def __init__(
        self,
        *,
        port: int = 0,
        strict_options: bool = False,
        api_key: str | None = None,
        context: int = 4096,
    ) -> None:
        self.strict_options = strict_options
        self.api_key = api_key
        self.context = context
        self.requests: list[dict[str, Any]] = []  # bodies of chat requests, in order
        self.disconnects = 0  # streams the client closed before their end
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        stub = self

        class Handler(_Handler):
            owner = stub

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.server.daemon_threads = True
        self.port = int(self.server.server_address[1])
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self._thread: threading.Thread | None = None

    def start(self) -> Stub:
        self._thread = threading.Thread(
            target=self.server.serve_forever, daemon=True, name="upstream-stub"
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop listening: from now on, connections are refused."""
        self.stopping.set()
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self) -> Stub:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def models_of(self, name: str) -> list[dict[str, Any]]:
        return [r for r in self.requests if r.get("model") == name]


class _Handler(BaseHTTPRequestHandler):
    owner: Stub
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        return

    # ------------------------------------------------------------------ helpers
    def _json(self, status: int, data: Any) -> None:
        raw = json.dumps(data).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    def _error(self, status: int, message: str | None = None) -> None:
        self._json(
            status,
            {"error": {"message": message or ERRORS[status], "type": "stub_error", "code": status}},
        )

    def _authorized(self) -> bool:
        key = self.owner.api_key
        if key and self.headers.get("Authorization") != f"Bearer {key}":
            self._error(401)
            return False
        return True

    def _chunk(self, data: bytes) -> None:
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()

    def _event(self, payload: Any) -> None:
        text = payload if isinstance(payload, str) else json.dumps(payload)
        self._chunk(f"data: {text}\n\n".encode())

    @staticmethod
    def _piece(model: str, content: str | None, finish: str | None = None) -> dict[str, Any]:
        delta = {"content": content} if content is not None else {}
        return {
            "id": "chatcmpl-stub",
            "object": "chat.completion.chunk",
            "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        }

    def _start_stream(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()

    # ------------------------------------------------------------------ routes
    def do_GET(self) -> None:
        if self.path.rstrip("/") != "/v1/models":
            self._error(404, f"no route {self.path}")
            return
        if not self._authorized():
            return
        data = [{"id": m, "object": "model", "owned_by": "stub"} for m in MODES]
        data[0]["max_model_len"] = self.owner.context
        self._json(200, {"object": "list", "data": data})

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length)
        if self.path.rstrip("/") != "/v1/chat/completions":
            self._error(404, f"no route {self.path}")
            return
        if not self._authorized():
            return
        try:
            body = json.loads(raw)
        except ValueError:
            self._error(400, "body is not JSON")
            return
        with self.owner.lock:
            self.owner.requests.append(body)
        if self.owner.strict_options and "stream_options" in body:
            self._error(400, "Unrecognized request argument supplied: stream_options")
            return
        model = str(body.get("model"))
        if model.startswith("e") and model[1:].isdigit():
            self._error(int(model[1:]))
            return
        handler = getattr(self, "_mode_" + model.replace("-", "_"), None)
        if handler is None:
            self._error(404, f"The model `{model}` does not exist")
            return
        try:
            handler(model, body)
        except (BrokenPipeError, ConnectionResetError):
            with self.owner.lock:
                self.owner.disconnects += 1
            self.close_connection = True

    # ------------------------------------------------------------------ modes
    def _mode_ok(self, model: str, body: dict[str, Any]) -> None:
        limit = body.get("max_tokens")
        pieces = OK_PIECES[:limit] if isinstance(limit, int) else OK_PIECES
        finish = "length" if len(pieces) < len(OK_PIECES) else "stop"
        self._start_stream()
        for p in pieces:
            self._event(self._piece(model, p))
        self._event(self._piece(model, None, finish))
        if (body.get("stream_options") or {}).get("include_usage"):
            self._event(
                {
                    "id": "chatcmpl-stub",
                    "object": "chat.completion.chunk",
                    "model": model,
                    "choices": [],
                    "usage": {
                        "prompt_tokens": 7,
                        "completion_tokens": len(pieces),
                        "total_tokens": 7 + len(pieces),
                    },
                }
            )
        self._event("[DONE]")
        self._chunk(b"")

    def _mode_slow(self, model: str, body: dict[str, Any]) -> None:
        self._start_stream()
        for i in range(1200):
            if self.owner.stopping.is_set():
                break
            self._event(self._piece(model, f"tok{i} "))
            time.sleep(0.05)
        self._event(self._piece(model, None, "length"))
        self._event("[DONE]")
        self._chunk(b"")

    def _mode_hang(self, model: str, body: dict[str, Any]) -> None:
        self.owner.stopping.wait(60)
        self.close_connection = True

    def _three(self, model: str) -> None:
        self._start_stream()
        for p in ("one", " two", " three"):
            self._event(self._piece(model, p))

    def _mode_cut(self, model: str, body: dict[str, Any]) -> None:
        self._three(model)
        self.wfile.write(b'40\r\ndata: {"trunc')  # half a chunk, then the socket goes
        self.wfile.flush()
        self.connection.shutdown(socket.SHUT_RDWR)
        self.close_connection = True

    def _mode_cut_clean(self, model: str, body: dict[str, Any]) -> None:
        self._three(model)
        self._chunk(b"")

    def _mode_interrupted(self, model: str, body: dict[str, Any]) -> None:
        self._three(model)
        self._event("[DONE]")
        self._chunk(b"")

    def _mode_midstream_error(self, model: str, body: dict[str, Any]) -> None:
        self._start_stream()
        self._event(self._piece(model, "partial"))
        self._event({"error": {"message": "stub: the GPU fell off the bus", "code": 500}})
        self._chunk(b"")

    def _mode_json(self, model: str, body: dict[str, Any]) -> None:
        self._json(
            200,
            {
                "id": "chatcmpl-stub",
                "object": "chat.completion",
                "model": model,
                "choices": [
                    {
                        "index": 0,
                        "finish_reason": "stop",
                        "message": {"role": "assistant", "content": "a whole answer"},
                    }
                ],
                "usage": {"prompt_tokens": 3, "completion_tokens": 3},
            },
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, default=8011)
    parser.add_argument("--strict-options", action="store_true")
    parser.add_argument("--api-key", default=None)
    args = parser.parse_args()
    stub = Stub(port=args.port, strict_options=args.strict_options, api_key=args.api_key)
    print(f"stub upstream on {stub.url}", flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        stub.server.serve_forever()


if __name__ == "__main__":
    main()
