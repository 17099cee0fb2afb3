"""The ``igora`` command's flags, one subcommand per role. Every default comes from the
module that owns it (the market's from the market, the broker's from its policies, ...)."""

from __future__ import annotations

import argparse
from pathlib import Path

from . import __version__
from . import arguments as arg
from .agent import DEFAULT_HEARTBEAT
from .broker import policies
from .broker.presence import DEFAULT_GRACE
from .client import DEFAULT_TIMEOUT
from .config import DEFAULT_HOST, env
from .credits import command as credits_cmd
from .credits.pricing import DEFAULT_GRANT
from .engines.config import (
    DEFAULT_CONTEXT,
    DEFAULT_DELAY,
    DEFAULT_ENGINE,
    DEFAULT_SLOTS,
    ENGINES,
    UPSTREAM_TIMEOUT,
)
from .gateway import cli as gateway_cli
from .gateway.defaults import DEFAULT_PORT as GATEWAY_PORT
from .header_timeout import DEFAULT_HEADER_TIMEOUT
from .market import command as market_command
from .market.limits import (  # the market's own defaults
    DEFAULT_COMPACT_EVERY,
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_MAX_IDENTITY_BYTES,
    DEFAULT_MAX_MESSAGE,
    DEFAULT_MAX_PER_ADDRESS,
    DEFAULT_MAX_ROOMS,
    DEFAULT_MAX_ROOMS_PER_ADDRESS,
    DEFAULT_PORT,
    DEFAULT_ROOM_IDLE,
    DEFAULT_TASK_RETENTION,
)
from .market.members import MODES
from .market.v3.bank import DEFAULT_RECEIPT_WAIT
from .worker.worker import DEFAULT_MAX_TOKENS

EXAMPLES = """\
Start a whole local market (market, broker, worker on the bundled model, gateway, web page):
  igora up
Then, in another terminal:
  igora chat "What is the capital of France? Answer in one short sentence."
  igora status

Join a remote market as a worker serving your own GGUF model:
  igora worker --market wss://market.example --model ~/models/my-model.gguf

Environment (also read from ./.env): YJS_ENV=LOCAL|REMOTE, YJS_LOCAL_URL, YJS_REMOTE_URL,
YJS_MARKET_ROOM, LLM_MODEL_NAME, IGORA_DATA.
"""


class Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Help with each option's default, unless its text already says it or there is
    none to say (``(default: None)`` teaches nothing)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if action.default in (None, False) or "default" in text:
            return text
        return super()._get_help_string(action)


def _market_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("market")
    g.add_argument(
        "--market",
        metavar="URL",
        type=arg.market_url,
        help="market websocket URL, or the URLs of its replicas comma-separated "
        "(default: from YJS_ENV / YJS_LOCAL_URL / YJS_REMOTE_URL, else ws://localhost:1234)",
    )
    g.add_argument(
        "--room", type=arg.room, help="market room (default: YJS_MARKET_ROOM or 'market')"
    )
    g.add_argument(
        "--invite",
        type=arg.invite,
        metavar="CODE",
        help="an invitation of the market's operator (`igora market invite`), to join a "
        "--secure market once; afterwards this identity (its data folder's key) is a "
        "member. Ignored in rooms of protocol 2",
    )
    g.add_argument(
        "--heartbeat",
        type=arg.positive_seconds,
        default=DEFAULT_HEARTBEAT,
        metavar="S",
        help="seconds between two awareness refreshes; peers count an agent as "
        "gone after 3 missed ones",
    )


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--log-level",
        default=env("IGORA_LOG_LEVEL", "info"),
        choices=["debug", "info", "warning", "error"],
        help="how much to log",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = arg.Parser(
        prog="igora",
        description="Igora: an open market where any machine can offer an LLM service "
        "and anyone can use it.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"igora {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser(
        "up",
        formatter_class=Formatter,
        help="start a complete local market in one command",
        description="Start market, broker, worker (bundled model) and gateway "
        "with web page; answer a first prompt to show it works; "
        "Ctrl-C stops everything.",
    )
    p.add_argument("--host", default=DEFAULT_HOST, help="address to listen on")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help="market port")
    p.add_argument(
        "--gateway-port", type=int, default=GATEWAY_PORT, help="OpenAI gateway and web page port"
    )
    p.add_argument("--no-gateway", action="store_true", help="do not start the gateway")
    arg.data_folder(p, "folder of the market's store")
    p.add_argument("--model", help="GGUF file for the worker (default: bundled SmolLM2-135M)")
    p.add_argument(
        "--engine", default=DEFAULT_ENGINE, choices=["llama", "echo"], help="worker engine"
    )
    p.add_argument(
        "--slots", type=arg.count(1), default=DEFAULT_SLOTS, help="tasks the worker runs at once"
    )
    p.add_argument("--no-check", action="store_true", help="skip the first prompt")
    p.add_argument(
        "--protocol",
        type=int,
        choices=[2, 3],
        default=2,
        help="what the room speaks: 2, open to any y-websocket agent; 3, each agent an "
        "identity (its own key under DATA/agents), prompts and answers encrypted end to "
        "end, credits (docs/protocol-v3.md)",
    )
    _common(p)

    p = sub.add_parser(
        "market",
        formatter_class=Formatter,
        help="run a market (y-websocket server) that agents join",
        description="Run the market: a y-websocket server hosting rooms "
        "(created on first join), persisted in DATA. With --redis, one of any number "
        "of replicas serving the same rooms; agents list them all: "
        "--market ws://a:1234,ws://b:1234. With an ACTION, manage who may join "
        "a --secure market instead (in DATA/market.sqlite3, also while it runs).",
        epilog="a secure market, members only (docs/security.md §5):\n"
        "  igora market --secure --data /srv/igora\n"
        "  igora market members add ID --note alice --data /srv/igora   # ID: her `igora id`\n"
        "  igora market ban ID --reason spam --data /srv/igora          # closed within 1 s\n"
        "  igora market --secure --members invite --data /srv/igora\n"
        "  igora market invite --uses 5 --ttl 2d --data /srv/igora      # prints igora-invite:…",
    )
    p.add_argument("--host", default=DEFAULT_HOST, help="address to listen on (0.0.0.0: everyone)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help="port")
    arg.data_folder(p, "folder of the store")
    p.add_argument("--memory", action="store_true", help="keep rooms in memory only")
    p.add_argument(
        "--redis",
        default=env("IGORA_REDIS"),
        metavar="URL",
        help="share the rooms with every market started with the same Redis "
        "(redis://host:6379/0; default: IGORA_REDIS): agents may join any of these "
        "replicas (see docs/market.md, Replicas). Replicas share one --data folder: "
        "the one holding the ledger's lease keeps the credits there",
    )
    p.add_argument(
        "--max-message",
        type=int,
        default=DEFAULT_MAX_MESSAGE,
        metavar="BYTES",
        help="largest websocket message accepted; bigger ones disconnect the sender",
    )
    p.add_argument(
        "--max-connections",
        type=int,
        default=DEFAULT_MAX_CONNECTIONS,
        help="connections in all",
    )
    p.add_argument(
        "--max-per-address",
        type=int,
        default=DEFAULT_MAX_PER_ADDRESS,
        help="connections from one IP address",
    )
    p.add_argument(
        "--max-identity-bytes",
        type=int,
        default=DEFAULT_MAX_IDENTITY_BYTES,
        metavar="BYTES",
        help="v3 rooms: bytes the documents one identity owns in a room may hold in all "
        "(its tasks and its long-lived documents); a write past it disconnects the "
        "writer (docs/protocol-v3.md §12.1)",
    )
    p.add_argument(
        "--task-retention",
        type=float,
        default=DEFAULT_TASK_RETENTION,
        metavar="S",
        help="v3 rooms: seconds a task document nobody reads or writes is kept before "
        "the market drops it (docs/protocol-v3.md §9)",
    )
    p.add_argument(
        "--room-idle",
        type=float,
        default=DEFAULT_ROOM_IDLE,
        metavar="S",
        help="seconds a room without connections stays in memory (it stays in the store)",
    )
    p.add_argument(
        "--compact-every",
        type=int,
        default=DEFAULT_COMPACT_EVERY,
        metavar="N",
        help="compact a room after N finished tasks (and when they pause): drop what "
        "Yjs keeps of tasks gone from the document, so that it stays small; "
        "0: never (see docs/faults.md)",
    )
    p.add_argument(
        "--max-rooms",
        type=int,
        default=DEFAULT_MAX_ROOMS,
        metavar="N",
        help="rooms in memory; past it the room idle the longest leaves memory, "
        "and a new room is refused if none is idle",
    )
    p.add_argument(
        "--max-rooms-per-address",
        type=int,
        default=DEFAULT_MAX_ROOMS_PER_ADDRESS,
        metavar="N",
        help="rooms in memory loaded by one IP address (each counts until it "
        "leaves memory, --room-idle after its last connection)",
    )
    p.add_argument(
        "--header-timeout",
        type=float,
        default=DEFAULT_HEADER_TIMEOUT,
        metavar="S",
        help="seconds a client has to send its request headers",
    )
    g = p.add_argument_group(
        "protocol 3 (docs/protocol-v3.md §12: the market's side is built; the roles are "
        "being ported)"
    )
    g.add_argument(
        "--secure",
        action="store_true",
        help="every room speaks protocol 3: a connection proves its identity (Ed25519 "
        "key) before it joins, and writes only the documents it owns; original "
        "y-websocket agents are refused with the reason. Who may join: --members. The "
        "market's own key is DATA/identity.key",
    )
    g.add_argument(
        "--members",
        choices=MODES,
        default=argparse.SUPPRESS,  # 'list' with --secure, 'open' without: said below
        help="who a --secure market admits: 'open' any id that proves itself; 'list' "
        "(the default) the ids of `igora market members add`, and the market's own; "
        "'invite' those, and ids that bring an invitation of `igora market invite`. A "
        "banned id (`igora market ban`) never. The --v3-room rooms of an open market "
        "are 'open'",
    )
    g.add_argument(
        "--v3-room",
        action="append",
        default=[],
        type=arg.room,
        metavar="NAME",
        help="this room speaks protocol 3 (repeatable); the others stay open version 2 rooms",
    )
    g.add_argument(
        "--broker-key",
        action="append",
        default=[],
        type=arg.agent_id,
        metavar="ID",
        help="with --secure: this identity may hold a room's broker lease (repeatable; "
        "the market's own key always may). In the --v3-room rooms of an open market "
        "any identity may",
    )
    g.add_argument(
        "--grant",
        type=arg.credits,
        default=DEFAULT_GRANT,
        metavar="N",
        help=f"credits an identity gets at its first handshake, once in its life (default "
        f"{DEFAULT_GRANT // 1000}; 0: none). An open market should give 0: free keys "
        "would mint credits (docs/credits.md). The ledger is DATA/ledger.sqlite3",
    )
    g.add_argument(
        "--model-params",
        type=arg.model_pin,
        action="append",
        default=[],
        metavar="NAME=B",
        help="the size of model NAME (as workers advertise it: the MODELS column of igora "
        "status) in billions of parameters, as this market prices it (repeatable; e.g. "
        "SmolLM2-135M-Instruct.Q4_1=0.135): a worker advertising a size of another price "
        "factor for that name is refused (docs/credits.md §1)",
    )
    g.add_argument(
        "--receipt-wait",
        type=arg.number(above=0),
        default=DEFAULT_RECEIPT_WAIT,
        metavar="S",
        help=f"seconds a worker's claim without receipt waits for the asker's receipt "
        f"before it is settled from what the market delivered (default "
        f"{DEFAULT_RECEIPT_WAIT:g})",
    )
    g.add_argument(
        "--behind-tls",
        action="store_true",
        help="a TLS proxy serves this market as wss://: no warning when a market with "
        "protocol 3 rooms listens beyond this machine",
    )
    _common(p)
    market_command.add_actions(p, Formatter)

    p = sub.add_parser(
        "broker",
        formatter_class=Formatter,
        help="assign waiting tasks to fitting workers",
        description="Run a broker. Several may run on one room: one is active, "
        "the others take over when it goes.",
    )
    p.add_argument("--name", default="broker", help="name shown to others")
    p.add_argument(
        "--grace",
        type=arg.seconds,
        default=DEFAULT_GRACE,
        metavar="S",
        help="seconds an agent may be missing before its tasks are re-queued "
        "(worker) or aborted (asker)",
    )
    p.add_argument(
        "--max-attempts",
        type=arg.count(1),
        default=policies.DEFAULT_MAX_ATTEMPTS,
        help="assignments of a task before it is failed",
    )
    p.add_argument(
        "--task-timeout",
        type=arg.positive_seconds,
        default=policies.DEFAULT_TIMEOUT,
        metavar="S",
        help="deadline of tasks that name none",
    )
    p.add_argument(
        "--retention",
        type=arg.seconds,
        default=policies.DEFAULT_RETENTION,
        metavar="S",
        help="seconds finished tasks stay in the live document (then archive only)",
    )
    p.add_argument(
        "--claim-timeout",
        type=arg.positive_seconds,
        default=policies.DEFAULT_CLAIM_TIMEOUT,
        metavar="S",
        help="seconds a present worker has to take a task assigned to it before "
        "the task goes to another one",
    )
    _market_options(p)
    _common(p)

    p = sub.add_parser(
        "worker",
        formatter_class=Formatter,
        help="offer an LLM on the market",
        description="Run a worker: it announces its models and runs the tasks assigned to it.",
    )
    p.add_argument("--name", default=None, help="name shown to others (default: worker-HOST)")
    p.add_argument(
        "--engine",
        default=DEFAULT_ENGINE,
        choices=ENGINES,
        help="llama: llama.cpp on a GGUF file; echo: deterministic test engine; "
        "openai: an OpenAI-compatible server",
    )
    p.add_argument(
        "--model",
        action="append",
        default=None,
        help="llama: GGUF path (default: LLM_MODEL_NAME or the bundled SmolLM2-135M); "
        "echo: model name; openai: NAME or NAME=ALIAS, repeatable",
    )
    p.add_argument(
        "--base-url", help="openai: the upstream's base URL (e.g. http://127.0.0.1:8000/v1)"
    )
    p.add_argument(
        "--params",
        action="append",
        default=None,
        metavar="[ALIAS=]B",
        help="openai: a model's size in billions of parameters, advertised for its price "
        "(docs/credits.md §1): ALIAS=8 for one model, 8 for every model not named; "
        "repeatable (default: none, priced as the smallest)",
    )
    p.add_argument(
        "--api-key", default=None, help="openai: the upstream's API key (default: OPENAI_API_KEY)"
    )
    p.add_argument(
        "--upstream-timeout",
        type=arg.positive_seconds,
        default=UPSTREAM_TIMEOUT,
        metavar="S",
        help="openai: seconds the upstream may stay silent before the task fails",
    )
    p.add_argument(
        "--context",
        type=arg.count(1),
        default=DEFAULT_CONTEXT,
        help="llama: context length in tokens",
    )
    p.add_argument("--threads", type=arg.count(1), default=None, help="llama: CPU threads")
    p.add_argument(
        "--embedding-model",
        default=None,
        metavar="PATH",
        help="llama: GGUF file for embeddings, served under its file name "
        "(default: the chat model also embeds)",
    )
    p.add_argument("--slots", type=arg.count(1), default=DEFAULT_SLOTS, help="tasks run at once")
    p.add_argument(
        "--delay", type=arg.seconds, default=DEFAULT_DELAY, help="echo: seconds per token"
    )
    p.add_argument(
        "--max-tokens",
        type=arg.max_tokens,
        default=DEFAULT_MAX_TOKENS,
        help="answer length limit for tasks that set none",
    )
    p.add_argument("--no-warmup", action="store_true", help="skip the speed measurement at start")
    _market_options(p)
    _common(p)

    p = sub.add_parser(
        "workers",
        formatter_class=Formatter,
        help="run several workers from one TOML file",
        description="Run every [[worker]] of a TOML file in this process, each "
        "its own agent on the market (see docs/workers.md).",
    )
    p.add_argument(
        "--config",
        type=Path,
        required=True,
        metavar="FILE",
        help="TOML file with one [[worker]] table per worker",
    )
    p.add_argument(
        "--check", action="store_true", help="only read the file and print the workers it describes"
    )
    _market_options(p)
    _common(p)

    p = sub.add_parser(
        "chat",
        formatter_class=Formatter,
        help="ask the market, stream the answer",
        description="Put one prompt on the market and print the answer as it streams in.",
    )
    p.add_argument("prompt", help="what to ask")
    p.add_argument("--model", default=None, help="model to ask for (default: any worker)")
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument(
        "--temperature",
        type=arg.temperature,
        default=None,
        help="sampling temperature, 0 to 2 (default: the worker's)",
    )
    p.add_argument("--seed", type=arg.seed, default=None)
    p.add_argument(
        "--max-tokens",
        type=arg.max_tokens,
        default=None,
        help="longest answer, in tokens (default: the worker's limit)",
    )
    p.add_argument(
        "--timeout",
        type=arg.positive_seconds,
        default=DEFAULT_TIMEOUT,
        help="seconds to wait for the answer",
    )
    p.add_argument("--no-stream", action="store_true", help="print the answer once complete")
    arg.trust_worker(p)
    _market_options(p)
    _common(p)

    p = sub.add_parser(
        "status",
        formatter_class=Formatter,
        help="agents and tasks on the market",
        description="Show the agents (type, state, models, slots) and the tasks by state. "
        "A market that admits members only shows a protocol 3 room to its members: there "
        "`igora status` connects as the identity of its data folder (IGORA_DATA).",
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")
    _market_options(p)
    _common(p)

    p = sub.add_parser(
        "id",
        formatter_class=Formatter,
        help="print this agent's identity",
        description="Print the id of the identity kept in the data folder: the\n"
        "base64url of an Ed25519 public key, made on first use in\n"
        "DATA/identity.key (mode 0600; a key file others may read is\n"
        "refused). Signatures and encryption of the secure market\n"
        "(being built: docs/security.md) name an agent by this id.\n"
        "Two data folders are two identities on one machine.",
    )
    arg.data_folder(p, "folder of the key")
    p.add_argument(
        "--json",
        action="store_true",
        help="print the id, the Ed25519 public key (hex) and the key file as JSON",
    )
    _common(p)

    credits_cmd.add_parser(sub, argparse.RawDescriptionHelpFormatter, _common)
    gateway_cli.add_parser(sub, Formatter, _market_options, _common)
    return parser
