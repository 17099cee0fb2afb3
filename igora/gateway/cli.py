"""``igora gateway``: serve the OpenAI-compatible API of a market over HTTP."""

from __future__ import annotations

import argparse
import asyncio
import logging
from collections.abc import Callable
from typing import Any

from .. import arguments as arg
from ..client import DEFAULT_TIMEOUT
from ..config import ConfigError, MarketAddress, data_dir, env, market_address
from ..header_timeout import DEFAULT_HEADER_TIMEOUT, http_protocol
from ..net import port_free
from ..v3.session import room_protocol
from ..v3.trust import refused_in_protocol_2, trust_list
from . import keys
from .defaults import DEFAULT_HOST, DEFAULT_PORT, GATEWAY_NAME, WAIT_WORKER

API_KEYS_ENV = "IGORA_API_KEYS"
KEEP_ALIVE = 75  # seconds an idle HTTP connection stays open: longer than clients keep
# theirs (httpx and the openai SDK: 5 s), so a client never sends a request on a
# connection the gateway is closing at the same moment (a reset, not an answer)

log = logging.getLogger("igora.gateway")


def add_parser(
    sub: Any,
    formatter: type[argparse.HelpFormatter],
    market_options: Callable[[argparse.ArgumentParser], None],
    common: Callable[[argparse.ArgumentParser], None],
) -> argparse.ArgumentParser:
    p: argparse.ArgumentParser = sub.add_parser(
        "gateway",
        formatter_class=formatter,
        help="serve an OpenAI-compatible API (and the web page) for a market",
        description="Serve the OpenAI API (/v1/chat/completions, /v1/responses, "
        "/v1/embeddings, /v1/completions, /v1/models) and the web page: every request "
        "becomes a task on the market. Point any OpenAI client at base_url "
        "http://HOST:PORT/v1; docs/gateway.md lists every field.",
    )
    p.add_argument("--host", default=DEFAULT_HOST, help="address to listen on (0.0.0.0: everyone)")
    p.add_argument("--port", type=arg.port, default=DEFAULT_PORT, help="port")
    p.add_argument(
        "--api-key",
        action="append",
        default=None,
        metavar="KEY",
        help=f"accept only requests with 'Authorization: Bearer KEY' (repeatable; "
        f"default: the comma-separated {API_KEYS_ENV}, else no key needed)",
    )
    p.add_argument(
        "--cors-origin",
        action="append",
        default=None,
        metavar="ORIGIN",
        help="browser origin allowed to call the API (repeatable; default: any, '*')",
    )
    p.add_argument(
        "--timeout",
        type=arg.positive_seconds,
        default=DEFAULT_TIMEOUT,
        metavar="S",
        help="deadline of each task, in seconds",
    )
    p.add_argument(
        "--wait-worker",
        type=arg.seconds,
        default=WAIT_WORKER,
        metavar="S",
        help="seconds a request waits for a worker serving its model to appear "
        "before failing with 503/404",
    )
    p.add_argument("--name", default=GATEWAY_NAME, help="name shown to others on the market")
    p.add_argument(
        "--header-timeout",
        type=arg.positive_seconds,
        default=DEFAULT_HEADER_TIMEOUT,
        metavar="S",
        help="seconds a client has to send its request headers",
    )
    arg.trust_worker(p)
    arg.data_folder(
        p,
        "data folder: with DATA/gateway/keys.sqlite3 (`igora gateway keys add`), "
        "only its keys are accepted",
    )
    market_options(p)
    common(p)
    actions = p.add_subparsers(dest="gateway_command", metavar="ACTION")
    keys.add_parser(actions, formatter)
    return p


def api_keys(args: argparse.Namespace) -> list[str]:
    if args.api_key:
        return [k for k in args.api_key if k]
    raw = env(API_KEYS_ENV) or ""
    return [k.strip() for k in raw.split(",") if k.strip()]


def _check_protocol_3(address: MarketAddress) -> None:
    """A trust list needs a protocol 3 room: the gateway waits for the market, as every
    role does (``room_protocol``), and refuses to start in a version 2 room rather than
    serve 503s (``Client.start`` would only log it)."""
    if not asyncio.run(room_protocol(address, GATEWAY_NAME)):
        raise refused_in_protocol_2(address.room_url)


def run(args: argparse.Namespace) -> int:
    if args.gateway_command == "keys":
        return keys.run(args)
    import uvicorn

    from .app import create_app

    key_store = keys.KeyStore.existing(args.data or data_dir())
    address = market_address(args.market, args.room, args.invite)  # fail early on a bad URL
    if not port_free(args.host, args.port):
        raise ConfigError(
            f"port {args.port} on {args.host} is taken (another gateway running?): "
            "stop it or choose another with --port"
        )
    plain = api_keys(args)
    trust = trust_list(args.trust_worker) if args.trust_worker else None  # checked now
    if trust is not None:
        _check_protocol_3(address)
    app = create_app(
        address.url,
        address.room,
        api_keys=plain,
        key_store=key_store,
        invite=address.invite,
        cors_origins=args.cors_origin or ["*"],
        timeout=args.timeout,
        wait_worker=args.wait_worker,
        heartbeat=args.heartbeat,
        name=args.name,
        trust_workers=trust,
    )
    checks = [f"{len(plain)} --api-key key(s)"] if plain else []
    if key_store is not None:
        checks.append(f"the keys of {key_store.path} ({len(key_store.entries())} now)")
    log.info(
        "gateway on http://%s:%d/v1 for market %s (%s)",
        args.host,
        args.port,
        address.room_url,
        " and ".join(checks) if checks else "no API key",
    )
    config = uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        log_config=None,
        log_level=args.log_level,
        access_log=False,
        timeout_graceful_shutdown=5,
        timeout_keep_alive=KEEP_ALIVE,
        http=http_protocol(None, args.header_timeout, log),
    )
    server = uvicorn.Server(config)
    server.run()
    return 0 if server.started else 1
