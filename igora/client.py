"""``igora.Client``: put tasks on the market and read their answers.

    async with Client() as client:                 # ws://localhost:1234, room "market"
        print(await client.chat("Bonjour"))
        async for piece in await client.chat("Raconte une histoire", stream=True):
            print(piece, end="")

``SyncClient`` offers the same without ``async``. How answers are read off the document
(and removed from ``done`` once read) is ``igora.answers``.

The same API serves both protocols: ``connect`` asks the market whether the room speaks
version 3 (``igora.v3.session.speaks_v3``) and then runs the v3 asker
(``igora.v3.asker``, with the identity of the data folder, ``IGORA_DATA``) or the v2
agent.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

from .agent import Agent
from .aio import within
from .answers import AnswerWatcher
from .capabilities import unservable
from .config import market_address
from .errors import IgoraError, MarketUnreachable, NotAdmitted, NoWorkerError, TaskFailed
from .identity import Identity, load_identity
from .protocol import (
    ABORTED_MARK,
    PROTOCOL_VERSION,
    TEXT_STYLE,
    AgentField,
    AgentType,
    MapName,
    Peer,
    State,
    TaskField,
    TaskKind,
    new_task_id,
    now_ms,
    validate_task,
)
from .sync_client import SyncClient
from .task_handle import RESTART_TEXT, Answer, Restart, Task, Watch
from .v3.asker import V3Asker
from .v3.session import Session, room_protocol, room_speaks_v3
from .v3.trust import refused_in_protocol_2, trust_list, unavailable

DEFAULT_TIMEOUT = 300.0

log = logging.getLogger("igora.client")

__all__ = [
    "DEFAULT_TIMEOUT",
    "RESTART_TEXT",
    "Answer",
    "Client",
    "Restart",
    "SyncClient",
    "Task",
]


class Client:
    """An asker on the market."""

    def __init__(
        self,
        market: str | None = None,
        room: str | None = None,
        *,
        name: str = "igora-client",
        style: str = TEXT_STYLE,
        timeout: float = DEFAULT_TIMEOUT,
        connect_timeout: float = 10.0,
        invite: str | None = None,
        trust_workers: Iterable[str] | None = None,
    ) -> None:
        """``trust_workers``: worker ids (or ``@FILE``s of them, ``igora.v3.trust``); if
        given, a task's prompt is sealed only to those workers and the broker may give it
        to no other (docs/security.md §6). Protocol 3 rooms only: ``connect`` raises
        TrustError in a version 2 room, where every agent reads every prompt."""
        self.address = market_address(market, room, invite)
        self.trust = trust_list(trust_workers) if trust_workers is not None else None
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.v3: V3Asker | None = None  # set by connect when the room speaks version 3
        self.askers: dict[str, V3Asker] = {}  # v3: one per identity spoken for, v3's too
        self._speakers: dict[str, Identity] = {}  # identities besides the data folder's
        self._proving: asyncio.Lock | None = None
        self._connected_at = time.monotonic()
        self._deciding: asyncio.Task[None] | None = None  # start(): waiting for the market
        self._failed: Exception | None = None  # why that wait ended without a connection
        self.agent = Agent(
            self.address,
            type=AgentType.CLIENT.value,
            name=name,
            style=style,
            connect_timeout=connect_timeout,
        )
        self._answers = AnswerWatcher(self.agent)

    async def __aenter__(self) -> Client:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def connect(self) -> None:
        speaks = await room_speaks_v3(self.address, self.connect_timeout)
        if speaks is None:
            raise MarketUnreachable(
                f"no market answered at {self.address.room_url} within "
                f"{self.connect_timeout:g} s: is `igora market` (or `igora up`) running?"
            )
        await self._start_as(speaks, wait=True)

    async def close(self) -> None:
        if self._deciding is not None:
            self._deciding.cancel()
            await asyncio.gather(self._deciding, return_exceptions=True)
        if self.v3 is not None:
            for asker in self.askers.values():
                for tid in asker.tracking:
                    asker.forget(tid)
            await asyncio.sleep(0.05)  # the last writes leave before the socket closes
            await self.v3.session.stop()
            return
        self._answers.drop_read()
        await self.agent.stop()

    async def _start_as(self, v3: bool, wait: bool) -> None:
        """Start the agent of the room's protocol: the v3 asker's session, or the
        version 2 agent; ``wait``: until it is connected."""
        if not v3:
            if self.trust is not None:
                raise refused_in_protocol_2(self.address.room_url)
            await self.agent.start(wait=wait)
            return
        identity, _ = load_identity()
        session = Session(
            self.address,
            [identity, *(i for i in self._speakers.values() if i.id != identity.id)],
            name=self.agent.name,
            state={"type": AgentType.CLIENT.value, "name": self.agent.name},
            connect_timeout=self.connect_timeout,
            invite=self.address.invite,
        )
        self.v3 = V3Asker(session, identity, self.trust)
        self.askers = {identity.id: self.v3}
        for other in self._speakers.values():
            self.askers.setdefault(other.id, V3Asker(session, other, self.trust))
        await session.start(wait=wait)
        self._connected_at = time.monotonic()

    async def speak_for(self, identity: Identity) -> None:
        """Put tasks as ``identity`` too (``submit(speaker=ID)``): a gateway's API key's
        (docs/security.md §7). In a v3 room one connection proves every identity spoken
        for: given before ``start``/``connect``, in the first handshake; later, the
        connection is made again to prove it (``Session.prove``). ``admitted`` says
        whether the market took it. A v2 room's tasks are signed by nobody: nothing
        changes there."""
        if identity.id in self._speakers or (self.v3 is not None and identity.id == self.id):
            return
        if self._proving is None:
            self._proving = asyncio.Lock()
        async with self._proving:  # two requests of a new key: one new handshake
            if identity.id in self._speakers:
                return
            if self.v3 is not None:
                await self.v3.session.prove(identity)
                self.askers[identity.id] = V3Asker(self.v3.session, identity, self.trust)
            self._speakers[identity.id] = identity

    def speaks_for(self, id: str) -> bool:
        """Whether tasks may be put as ``id`` (this client's or a ``speak_for`` one)."""
        return id == self.id or id in self._speakers

    def admitted(self, id: str) -> bool:
        """Whether the market admitted ``id`` on the current connection (a v2 room
        admits everyone: its tasks name their asker, unsigned)."""
        return self.v3 is None or id in self.v3.session.granted

    @property
    def error(self) -> Exception | None:
        """Why the market ended this client's connection for good (a v3 refusal), if it
        did: the client does not retry."""
        if self._failed is not None:
            return self._failed
        return self.v3.session.error if self.v3 is not None else None

    def _asker(self, speaker: str | None) -> V3Asker:
        assert self.v3 is not None
        asker = self.v3 if speaker is None else self.askers.get(speaker)
        if asker is None:
            raise ValueError(f"{speaker}: not an identity this client speaks for (speak_for)")
        if asker.session.ready.is_set() and asker.id not in asker.session.granted:
            raise NotAdmitted(
                f"the market at {self.address.room_url} did not admit the identity "
                f"{asker.id} (not a member, or banned): ask its operator for "
                f"`igora market members add {asker.id}`; it is proved again at the next "
                "connection",
                asker.id,
            )
        return asker

    def _asker_of(self, task_id: str) -> V3Asker | None:
        return next((a for a in self.askers.values() if a.holds(task_id)), None)

    # ------------------------------------------------------------------ market view
    def workers(self) -> list[Any]:
        if self.v3 is not None:
            return self.v3.workers()
        return [p for p in self.agent.peers() if p.type == AgentType.WORKER.value]

    def models(self) -> list[str]:
        """Models served by the workers on the market now."""
        names: set[str] = set()
        for w in self.workers():
            names.update(w.models)
        return sorted(names)

    async def wait_for_worker(
        self, model: str | None, timeout: float, task: dict[str, Any] | None = None
    ) -> None:
        """Wait until a worker that could serve ``task`` (or any task for ``model``) is on
        the market; NoWorkerError naming the missing model or capability after ``timeout``."""
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        probe = task or {
            TaskField.ID: "probe",
            TaskField.PROTOCOL: PROTOCOL_VERSION,
            TaskField.MODEL: model,
            TaskField.PROMPT: "",
        }
        while True:
            why = unservable(probe, self.workers())
            if why is None:
                return
            if loop.time() >= end:
                reason = why.reason if why.missing else None
                if self.trust is not None:  # workers() and models() are the trusted ones
                    reason = unavailable(len(self.trust), why.reason, bool(self.workers()))
                raise NoWorkerError(model, self.models(), why.missing, reason)
            await asyncio.sleep(0.1)

    # ------------------------------------------------------------------ tasks
    def _task(
        self,
        prompt: str | list[dict[str, str]],
        *,
        model: str | None,
        system: str | None,
        temperature: float | None,
        top_p: float | None,
        seed: int | None,
        max_tokens: int | None,
        stop: str | list[str] | None,
        timeout: float,
        extra: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        tid = new_task_id()
        task: dict[str, Any] = {
            TaskField.ID: tid,
            TaskField.PROTOCOL: PROTOCOL_VERSION,
            TaskField.ASKER: self.agent.id,
            TaskField.ASKER_NAME: self.agent.name,
            TaskField.CLIENT_ID: self.agent.awareness.client_id,
            TaskField.STYLE: TEXT_STYLE,
            TaskField.STATE: State.TODO.value,
            TaskField.DATE: now_ms(),
            TaskField.DEADLINE: now_ms() + int(timeout * 1000),
            TaskField.SYSTEM_PROMPT: system or "",
        }
        if isinstance(prompt, str):
            task[TaskField.PROMPT] = prompt
        elif prompt is not None:
            task[TaskField.MESSAGES] = [dict(m) for m in prompt]
        optional = {
            TaskField.MODEL: model,
            TaskField.TEMPERATURE: temperature,
            TaskField.TOP_P: top_p,
            TaskField.SEED: seed,
            TaskField.MAX_TOKENS: max_tokens,
            TaskField.STOP: stop,
            **(extra or {}),
        }
        task.update({k: v for k, v in optional.items() if v is not None})
        return validate_task(task)

    async def submit(
        self,
        prompt: str | list[dict[str, str]],
        *,
        model: str | None = None,
        system: str | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        max_tokens: int | None = None,
        stop: str | list[str] | None = None,
        timeout: float | None = None,
        wait_worker: float = 5.0,
        tools: list[dict[str, Any]] | None = None,
        tool_choice: str | dict[str, Any] | None = None,
        response_format: dict[str, Any] | None = None,
        n: int | None = None,
        logprobs: bool | None = None,
        top_logprobs: int | None = None,
        speaker: str | None = None,
        _pieces: bool = True,
        _extra: dict[str, Any] | None = None,
    ) -> Task:
        """Put a task on the market and return its handle (raises NoWorkerError if no
        worker serving ``model`` with what the task needs (tools, a response format,
        n > 1, logprobs) shows up within ``wait_worker`` seconds).

        ``tools``, ``tool_choice`` and ``response_format`` take OpenAI's shapes.
        ``speaker``: the id of an identity given to ``speak_for``, that the task is put
        as in a v3 room (default: the data folder's); ``NotAdmitted`` if the market did
        not admit it."""
        timeout = timeout or self.timeout
        asker = self._asker(speaker) if self.v3 is not None else None
        extra = {
            TaskField.TOOLS: tools,
            TaskField.TOOL_CHOICE: tool_choice,
            TaskField.RESPONSE_FORMAT: response_format,
            TaskField.N: n,
            TaskField.LOGPROBS: logprobs,
            TaskField.TOP_LOGPROBS: top_logprobs,
            **(_extra or {}),
        }
        task = self._task(
            prompt,
            model=model,
            system=system,
            temperature=temperature,
            top_p=top_p,
            seed=seed,
            max_tokens=max_tokens,
            stop=stop,
            timeout=timeout,
            extra=extra,
        )
        await self.wait_for_worker(model, wait_worker, task)
        watch = Watch(task[TaskField.ID], pieces=_pieces)
        if asker is not None:
            asker.submit(task, watch)
            return Task(self, task, watch, timeout)
        self._answers.watch(watch)
        with self.agent.transaction():
            self._answers.drop_read()
            self.agent.maps[MapName.TODOS][task[TaskField.ID]] = task
        return Task(self, task, watch, timeout)

    async def chat(
        self,
        prompt: str | list[dict[str, str]],
        *,
        stream: bool = False,
        **options: Any,
    ) -> Any:
        """Ask and return the answer's text, or with ``stream=True`` an async iterator of
        text pieces (a ``Restart`` piece marks a restart on another worker).

        Options: ``model``, ``system``, ``temperature``, ``top_p``, ``seed``,
        ``max_tokens``, ``stop``, ``timeout``, and ``tools``, ``tool_choice``,
        ``response_format``, ``n``, ``logprobs``, ``top_logprobs`` (OpenAI's shapes).
        With ``tools``, ``n`` > 1 or ``logprobs`` the result is the whole ``Answer``
        (``.text``, ``.tool_calls``, ``.choices``, ``.logprobs``), not only its text."""
        task = await self.submit(prompt, _pieces=stream, **options)
        if stream:
            return task.stream()
        answer = await task.result()
        if options.get("tools") or (options.get("n") or 1) > 1 or options.get("logprobs"):
            return answer
        return answer.text

    async def embed(
        self,
        inputs: str | list[str],
        *,
        model: str | None = None,
        dimensions: int | None = None,
        timeout: float | None = None,
        wait_worker: float = 5.0,
    ) -> list[list[float]]:
        """One vector per input text (a worker whose model offers ``embed`` computes them)."""
        texts = [inputs] if isinstance(inputs, str) else list(inputs)
        task = await self.submit(
            None,  # type: ignore[arg-type]  # an embed task has inputs, not a prompt
            model=model,
            timeout=timeout,
            wait_worker=wait_worker,
            _pieces=False,
            _extra={
                TaskField.KIND: TaskKind.EMBED.value,
                TaskField.INPUTS: texts,
                TaskField.DIMENSIONS: dimensions,
            },
        )
        answer = await task.result()
        vectors = answer.task.get(TaskField.EMBEDDINGS)
        if not isinstance(vectors, list) or len(vectors) != len(texts):
            raise TaskFailed(f"task {task.id}: the worker sent no embeddings", answer.task)
        return [[float(x) for x in v] for v in vectors]

    async def balance(self, speaker: str | None = None) -> int | None:
        """This identity's balance in the market's ledger, in millicredits (credits.md),
        or that of ``speaker`` (an identity given to ``speak_for``); None in a version 2
        room, or when the market does not answer."""
        return await self._asker(speaker).balance() if self.v3 is not None else None

    async def can_pay(
        self,
        prompt: str | list[dict[str, Any]] | None,
        *,
        model: str | None = None,
        max_tokens: int | None = None,
        speaker: str | None = None,
    ) -> bool:
        """Whether the balance of this identity (or ``speaker``'s) covers the most such a
        request may cost (every prompt byte a token, ``max_tokens`` completion tokens, the
        largest model size advertised): the gateway's 402. True when the market does not
        count credits. A balance the market answered less than a second ago admits the
        request without asking again; a refusal is always decided on a new answer (one
        round trip to the market)."""
        if self.v3 is None:
            return True
        asker = self._asker(speaker)
        size = len(json.dumps(prompt, ensure_ascii=False).encode())
        price = self.v3.max_price({TaskField.MODEL: model, TaskField.MAX_TOKENS: max_tokens}, size)
        recent = asker.recent_balance()
        if recent is not None and recent >= price:
            return True
        balance = await asker.balance()
        return balance is None or balance >= price

    def abort(self, task_id: str) -> None:
        """Ask for a task to stop; it ends ``aborted``."""
        if self.v3 is not None:
            asker = self._asker_of(task_id)
            if asker is not None:
                asker.abort(task_id)
            return
        m = self.agent.maps
        with self.agent.transaction():
            for source in (MapName.TODOS, MapName.PREPARED, MapName.DOING):
                value = m[source].get(task_id)
                if isinstance(value, dict) and not value.get(TaskField.ABORTED):
                    m[source][task_id] = {**value, TaskField.ABORTED: ABORTED_MARK}

    def _forget(self, task_id: str) -> None:
        """Called by a ``Task`` once its answer is read."""
        if self.v3 is not None:
            asker = self._asker_of(task_id)
            if asker is not None:
                asker.forget(task_id)
            return
        self._answers.forget(task_id)

    # ------------------------------------------------------------------ for the gateway
    # and the web page: what they read of the market, without reaching into the agent.
    @property
    def id(self) -> str:
        """This client's agent id on the market (tasks name it as their asker)."""
        return self.v3.id if self.v3 is not None else self.agent.id

    @property
    def name(self) -> str:
        return self.agent.name

    @property
    def connected(self) -> bool:
        """Connected to the market and its document synced."""
        if self.v3 is not None:
            return self.v3.session.connected
        return self.agent.connected and self.agent.synced.is_set()

    def connected_for(self) -> float:
        """Seconds since the last (re)connection to the market."""
        if self.v3 is not None:
            return time.monotonic() - self._connected_at
        return time.monotonic() - self.agent.connected_at

    async def start(self) -> None:
        """Start connecting without waiting for the market (``connect`` waits); the
        connection is retried in the background until ``close``. A market that does not
        answer at once is waited for in the background too, and the room's protocol
        decided when it answers (``igora.v3.session.room_protocol``)."""
        speaks = await room_speaks_v3(self.address, 0)
        if speaks is not None:
            await self._start_as(speaks, wait=False)
            return

        async def when_up() -> None:
            try:
                await self._start_as(await room_protocol(self.address, self.name), wait=False)
            except IgoraError as exc:  # a trust list in a version 2 room
                log.error("%s: %s", self.name, exc)
                self._failed = exc

        self._deciding = asyncio.get_running_loop().create_task(when_up())

    async def wait_synced(self, timeout: float) -> bool:
        """Whether the market's document arrived within ``timeout`` seconds (in a v3
        room, False at once if the market refused the session for good)."""
        if self.v3 is not None:
            return await self.v3.session.wait_ready(timeout)
        try:
            await within(self.agent.synced.wait(), timeout)
        except asyncio.TimeoutError:
            return False
        return True

    def set_heartbeat(self, seconds: float) -> None:
        """Refresh this client's awareness every ``seconds`` (peers count it gone after
        three missed refreshes)."""
        self.agent.heartbeat = seconds
        self.agent.set_state(**{AgentField.HEARTBEAT: seconds})

    def peers(self) -> list[Peer]:
        """Every other agent on the market now (workers, brokers, askers; in a v3 room
        the workers of ``dir``: only brokers read who is present)."""
        if self.v3 is not None:
            return self.v3.workers()
        return self.agent.peers()

    def own_state(self) -> tuple[int, dict[str, Any]]:
        """This client's awareness id and the state it announces."""
        return self.agent.awareness.client_id, self.agent.local_state

    def worker_of(self, task_id: str) -> str | None:
        """The id of the worker running (or that ran) a task still in the document."""
        if self.v3 is not None:
            asker = self._asker_of(task_id)
            return asker.worker_of(task_id) if asker is not None else None
        for m in (MapName.DOING, MapName.DONE):
            value = self.agent.maps[m].get(task_id)
            if isinstance(value, dict) and isinstance(value.get(TaskField.WORKER), str):
                return value[TaskField.WORKER]  # type: ignore[no-any-return]
        return None

    def entries(self, name: MapName) -> list[tuple[str, Any]]:
        """The entries of one of the room's task maps, as a list (a copy); none in a v3
        room, which has no shared task maps."""
        if self.v3 is not None:
            return []
        return list(self.agent.maps[name].items())

    def on_change(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` after every change of the room (document or awareness)."""
        self.agent.on_change(callback)

    def on_entries(
        self, name: MapName, callback: Callable[[dict[str, dict[str, Any]]], None]
    ) -> None:
        """Call ``callback`` with the changed keys of a task map (``{key: {"action",
        "newValue", ...}}``), after each transaction that changes it."""
        self.agent.observe_keys(name, callback)
