"""The ``igora`` command: a thin shell over the library, one subcommand per role. Its
flags are declared in ``igora.parser``; here they become each role's settings."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import faulthandler
import logging
import os
import socket
import sys
from collections.abc import Callable, Coroutine
from typing import IO, Any

from . import arguments as arg
from .config import ConfigError, MarketAddress, data_dir, market_address
from .engines.base import EngineError
from .engines.config import EngineConfig
from .errors import IgoraError
from .parser import build_parser
from .serving import WorkerSpec

__all__ = ["build_parser", "main", "setup_logging", "worker_spec"]


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    for noisy in ("websockets", "httpx", "uvicorn.access", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _run(coro_factory: Callable[[], Coroutine[Any, Any, int]]) -> int:
    try:
        return asyncio.run(coro_factory())
    except KeyboardInterrupt:
        return 130


_crash_file: IO[str] | None = None


def _report_crashes() -> None:
    """On a crash in native code (llama.cpp: SIGSEGV, SIGILL, ...) print where Python was,
    not only the shell's "Segmentation fault". To a copy of stderr: llama-cpp-python points
    stderr at /dev/null while it loads a model, which is when such crashes happen."""
    global _crash_file
    if _crash_file is None:
        with contextlib.suppress(OSError, ValueError):
            _crash_file = os.fdopen(os.dup(sys.stderr.fileno()), "w")
    faulthandler.enable(file=_crash_file or sys.stderr)


def main(argv: list[str] | None = None) -> int:
    _report_crashes()
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 0
    setup_logging(args.log_level)
    try:
        return int(_dispatch(args) or 0)
    except (IgoraError, ConfigError, EngineError, OSError) as exc:
        return arg.fail(f"igora {args.command}", str(exc))
    except KeyboardInterrupt:
        return 130


def worker_spec(args: argparse.Namespace, address: MarketAddress) -> WorkerSpec:
    """``igora worker``'s flags as the worker's settings."""
    engine = EngineConfig(
        engine=args.engine,
        models=tuple(args.model or ()),
        base_url=args.base_url,
        api_key=args.api_key,
        upstream_timeout=args.upstream_timeout,
        context=args.context,
        threads=args.threads,
        embedding_model=args.embedding_model,
        slots=args.slots,
        delay=args.delay,
        params=tuple(args.params or ()),
    )
    return WorkerSpec(
        args.name or f"worker-{socket.gethostname()}",
        address,
        engine,
        max_tokens=args.max_tokens,
        heartbeat=args.heartbeat,
        warmup=not args.no_warmup,
    )


def _dispatch(args: argparse.Namespace) -> int | None:
    from . import roles

    if args.command == "market":
        from .market.limits import MarketSettings
        from .market.run import run_market

        if args.market_command:
            from .market.command import run as market_action

            return market_action(args)
        members = getattr(args, "members", None) or ("list" if args.secure else "open")
        if members != "open" and not args.secure:
            raise ConfigError(f"--members {members} needs --secure (--v3-room rooms are open)")
        if members != "open" and args.memory:
            raise ConfigError(
                f"--members {members} needs a store for its members (--data), not --memory"
            )
        data = None if args.memory else (args.data or data_dir())
        settings = MarketSettings(
            max_message=args.max_message,
            max_connections=args.max_connections,
            max_per_address=args.max_per_address,
            room_idle=args.room_idle,
            task_retention=args.task_retention,
            max_identity_bytes=args.max_identity_bytes,
            compact_every=args.compact_every,
            max_rooms=args.max_rooms,
            max_rooms_per_address=args.max_rooms_per_address,
            header_timeout=args.header_timeout,
            secure=args.secure,
            v3_rooms=frozenset(args.v3_room),
            broker_keys=frozenset(args.broker_key),
            members=members,
            redis=args.redis,
            grant=args.grant,
            receipt_wait=args.receipt_wait,
            model_params=tuple(args.model_params),
        )
        run_market(
            args.host,
            args.port,
            data,
            settings,
            identity_data=args.data,
            behind_tls=args.behind_tls,
        )
        return 0
    if args.command == "up":
        from .up import up

        return up(args)
    if args.command == "gateway":
        from .gateway.cli import run as run_gateway

        return run_gateway(args)
    if args.command == "id":
        from .identity import show

        return show(args.data, args.json)
    if args.command == "credits":
        from .credits.command import run as credits

        return credits(args)
    if args.command == "workers":
        from .workers_config import Defaults, run_workers

        defaults = Defaults(args.market, args.room, args.heartbeat, args.invite)
        return _run(lambda: run_workers(args.config, defaults, check=args.check))
    address = market_address(
        getattr(args, "market", None), getattr(args, "room", None), getattr(args, "invite", None)
    )
    if args.command == "broker":
        return _run(
            lambda: roles.run_broker(
                address,
                name=args.name,
                heartbeat=args.heartbeat,
                grace=args.grace,
                max_attempts=args.max_attempts,
                task_timeout=args.task_timeout,
                retention=args.retention,
                claim_timeout=args.claim_timeout,
            )
        )
    if args.command == "worker":
        return _run(lambda: roles.run_worker(worker_spec(args, address)))
    if args.command == "chat":
        return _run(
            lambda: roles.chat(
                address,
                args.prompt,
                stream=not args.no_stream,
                timeout=args.timeout,
                model=args.model,
                system=args.system,
                temperature=args.temperature,
                seed=args.seed,
                max_tokens=args.max_tokens,
                trust_workers=args.trust_worker,
            )
        )
    if args.command == "status":
        return _run(lambda: roles.status(address, as_json=args.json, invite=args.invite))
    raise SystemExit(f"unknown command {args.command}")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
