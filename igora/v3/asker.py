"""The asker's role in a v3 room (docs/protocol-v3.md §7.2 steps 1, 3, 7, 9; §7.3):
what ``igora.Client`` runs when the room speaks version 3.

A task is the signed header in ``a/<own id>.tasks[tid]`` (with this process's session
key, ``key``, and the ``candidates``) and the prompt document ``p/<own id>/<tid>``: the
private request fields sealed under a fresh task key (``ct``) and that key granted to
each candidate worker whose signed advert in ``dir`` checks (``grants``; docs/security.md
§6). The asker reads its inbox ``in/<own id>``: the broker's status names the worker and
the attempt (a worker without a grant gets one then: the late grant of protocol-v3.md
§7.2), and the broker attaches the run document ``r/<worker>/<tid>.<n>``, whose
``chunks`` are opened by an ``AnswerReader`` and feed the task's ``Watch`` as v2's
streams do, and whose ``run`` state ends it (its clear ``usage`` must equal the final
chunk's); any chunk that does not open fails the task with the reason. A status
``failed`` or ``aborted`` ends it too. A new attempt restarts the answer (the
``Restart`` marker). Abort marks ``p/…abort`` (the worker) and ``a/….aborts`` (the
broker). Once the answer is read the header is deleted, the prompt document dropped and
the run unsubscribed; the broker then cleans the inboxes and the worker drops its run.

Credits (credits.md §3): the header carries ``maxPrice`` (the consent: every prompt byte
a token and ``maxTokens`` completion tokens at the largest size advertised in ``dir``);
once a run is done and its final chunk checked, the asker signs a receipt (the run's
usage, the hash of its chunks, priced by the worker's advertised ``params``) and writes
in ``p/….receipts[n]`` what of it the attached worker does not know (``Receipt.written``:
the token counts, the price, the signature), which it completes and claims with.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from dataclasses import dataclass, field
from typing import Any

from nacl.public import PublicKey
from pycrdt import Array, Doc, Map

from ..aio import within
from ..capabilities import fits, required
from ..credits import pricing
from ..credits.receipts import ClaimError, Receipt, RunHash
from ..identity import Identity, IdentityError, unb64url
from ..protocol import ErrorCode, Peer, TaskField, now_ms, number
from ..task_handle import NOT_ADMITTED, Watch
from . import advert as adverts
from .crypto import (
    AnswerReader,
    CryptoError,
    Final,
    asker_answer_key,
    new_task_key,
    private_part,
    seal_grant,
    seal_grants,
    seal_prompt,
)
from .header import header_hash, sign_header
from .session import Event, EventKind, Session
from .tasks import (
    ABORT,
    ABORTS,
    ANY_MODEL,
    CHUNKS,
    CIPHERTEXT,
    FINAL_RUNS,
    GRANTS,
    PROMPT,
    RECEIPTS,
    RUN,
    TASKS,
    Header,
    RunField,
    RunState,
    Status,
    StatusState,
    asker_doc,
    inbox,
    prompt_doc,
    run_doc,
)
from .wire import Code, notice_answer

log = logging.getLogger("igora.client")

MAX_CANDIDATES = 2
"""Grants made with a task (a sealed box each: ~0.1 ms and 128 bytes), to workers drawn
at random among those that fit; another worker the broker chooses gets one late (when
every slot is taken, most tasks go to whichever worker frees one first: grants made
in advance to many workers were mostly wasted)."""
CONSENT_TOKENS = 4096
"""Completion tokens the consent (``maxPrice``) covers for a task that sets no maxTokens."""
BALANCE_WAIT = 2.0  # seconds the market has to answer a balance question
BALANCE_FRESH = 1.0
"""Seconds a balance the market answered may admit a request without asking it again
(``recent_balance``: the gateway's 402, docs/credits.md §8)."""


@dataclass
class Track:
    """Where the answer of one task is read from."""

    watch: Watch
    task: dict[str, Any]
    header: dict[str, Any]
    hashed: str  # header_hash(header): in each grant and in the receipt, computed once
    key: bytes  # the task key
    granted: dict[str, bytes]  # worker id -> the session key its grant was sealed to
    worker: str | None = None
    attempt: int = 0
    read: int = 0  # chunks of the current attempt's run fed to the watch
    reader: AnswerReader | None = None  # of the current attempt's run, once its salt is read
    # the hash of the chunks read (the receipt's run), kept as they are read: the run's
    # chunks are not read a second time to sign
    run: RunHash = field(default_factory=RunHash)


@dataclass
class FromDir:
    """What the asker derives from one read of ``dir.workers`` (``V3Asker._from_dir``),
    once per change of ``dir`` rather than for every task."""

    listed: dict[str, Any] | None  # the read it comes from
    peers: dict[str, Peer] = field(default_factory=dict)  # the workers as Peers, by id
    tops: dict[str, str] = field(default_factory=dict)  # model -> largest size advertised
    # (model, needs) -> the workers not busy whose adverts check and that serve them,
    # with their session keys: what a task's candidates are drawn from
    fitting: dict[tuple[str | None, frozenset[str]], list[tuple[str, PublicKey]]] = field(
        default_factory=dict
    )


class V3Asker:
    """Puts tasks in a v3 room and reads their answers, for ``identity``."""

    def __init__(
        self, session: Session, identity: Identity, trust: frozenset[str] | None = None
    ) -> None:
        self.session = session
        self.identity = identity
        self.id = identity.id
        # the only workers the task key is sealed to, if given (``Client(trust_workers)``,
        # docs/security.md §6): every header lists them with ``candidatesOnly``
        self.trust = trust
        self._session_key = identity.session_key()  # answers are sealed to it: memory only
        self._adverts: dict[str, tuple[str, PublicKey]] = {}  # id -> (advert sig, its key)
        session.own(asker_doc(self.id))
        # the tasks whose status changed since the inbox was last looked at: with many
        # tasks in flight on one connection (a gateway), every status update looked at
        # every task
        self._statuses_changed: set[str] = set()
        self._watched: Doc[Any] | None = None  # the inbox Doc whose statuses are observed
        session.subscribe(inbox(self.id))
        self._watch_inbox()
        session.subscribe("dir")
        self._dir_read: dict[str, Any] | None = None  # dir.workers as read (``_listed``)
        self._derived = FromDir(None)  # from that read of dir (``_from_dir``)
        self._prices: tuple[dict[str, Any] | None] | None = None  # prices() once per dir
        self._enc_key = str(self._session_key.fields()["encKey"])  # in every header
        self._tracks: dict[str, Track] = {}
        self._ended: set[str] = set()
        self._balances: list[asyncio.Future[int]] = []
        self._known: tuple[int, float] | None = None  # the last balance answered, and when
        self._asked = 0.0  # when a balance was last asked (time.monotonic)
        self._unwaited = 0  # balance questions of recent_balance's, not answered yet
        self.receipts = True  # sign a receipt for each run read (False: a test's rogue)
        session.observe(self._on_event)

    # Read from the session each time: a new epoch of any of them (protocol-v3.md §9),
    # or a copy read afresh after a market restart, is a new Doc.
    @property
    def _asker(self) -> Doc[Any]:
        return self.session.docs[asker_doc(self.id)]

    @property
    def _inbox(self) -> Doc[Any] | None:
        return self.session.docs.get(inbox(self.id))

    @property
    def _dir(self) -> Doc[Any] | None:
        return self.session.docs.get("dir")

    def _watch_inbox(self) -> None:
        """Note which statuses of the inbox change, from its current ``Doc`` (a new one
        after a refusal or a new epoch: then every status is looked at once). The map and
        its observer are both kept: pycrdt drops an observer nobody references."""
        doc = self._inbox
        if doc is None or doc is self._watched:
            return
        self._watched = doc
        self._statuses = doc.get(TASKS, type=Map)
        self._statuses_sub = self._statuses.observe(
            lambda event: self._statuses_changed.update(event.keys)
        )
        self._statuses_changed.update(self._statuses.keys())

    # ------------------------------------------------------------------ the market
    def workers(self) -> list[Peer]:
        """The workers advertised in ``dir`` (as the v2 policies see them); with a trust
        list, only those in it."""
        peers = self._from_dir().peers
        if self.trust is None:
            return list(peers.values())
        return [p for id_, p in peers.items() if id_ in self.trust]

    def _from_dir(self) -> FromDir:
        """The workers of ``dir`` as Peers, by id; the largest size advertised per model
        (``max_price``) and the workers fit for a kind of task (``_candidates``), filled
        as asked: made again only once ``dir`` changed, not for every task (a client
        asks for the workers before each task)."""
        from .broker import worker_peer  # the one place that maps an advert to a Peer

        listed = self._listed()
        if self._derived.listed is not listed:
            peers = {
                i: worker_peer(a) for i, a in listed.items() if isinstance(a, dict) and "id" in a
            }
            self._derived = FromDir(listed, peers)
        return self._derived

    def _listed(self) -> dict[str, Any]:
        """``dir.workers`` as a dict (never to be changed: it is shared), read again only
        once ``dir`` changed: not at every task."""
        if self._dir is None:
            return {}
        if self._dir_read is None:
            self._dir_read = dict(self._dir.get("workers", type=Map).items())
        return self._dir_read

    def holds(self, tid: str) -> bool:
        """Whether ``tid`` is one of this asker's tasks whose answer is not read yet."""
        return tid in self._tracks

    @property
    def tracking(self) -> list[str]:
        """The tasks whose answer is not read yet."""
        return list(self._tracks)

    def worker_of(self, tid: str) -> str | None:
        track = self._tracks.get(tid)
        return track.worker if track else None

    def worker_key(self, worker: str) -> PublicKey | None:
        """The session key of ``worker``'s advert in ``dir``, if the advert checks
        (signature and ``encSig``: ``advert.check``); None otherwise."""
        return self._key_of(worker, self._listed().get(worker))

    def _key_of(self, worker: str, raw: Any) -> PublicKey | None:
        if not isinstance(raw, dict):
            return None
        known = self._adverts.get(worker)
        if known is not None and known[0] == raw.get("sig"):
            return known[1]
        try:
            advert = adverts.check(raw)
            if advert["id"] != worker:
                raise adverts.AdvertError("its id is not where it was written")
            key = PublicKey(unb64url(advert["encKey"], 32, "encKey"))
        except (adverts.AdvertError, IdentityError) as exc:
            log.warning("advert of %s not used: %s", worker[:8], exc)
            return None
        self._adverts[worker] = (str(advert["sig"]), key)
        return key

    def _candidates(self, task: dict[str, Any]) -> dict[str, PublicKey]:
        """Up to MAX_CANDIDATES workers of ``dir`` that serve ``task``, not busy, whose
        adverts check, drawn at random (the broker picks among them first: the same
        first few for every task would pile the tasks on them): id -> session key. With
        a trust list: every trusted worker of those (the list is short, and the broker
        may pick no other)."""
        model, needs = task.get(TaskField.MODEL) or None, required(task)
        derived = self._from_dir()
        fitting = derived.fitting.get((model, needs))
        if fitting is None:
            fitting = derived.fitting[(model, needs)] = []
            for id_, raw in (derived.listed or {}).items():
                if not isinstance(raw, dict) or raw.get("state") == "busy":
                    continue
                key = self._key_of(id_, raw)
                peer = derived.peers.get(id_)
                if key is not None and peer is not None and fits(peer, model, needs):
                    fitting.append((id_, key))
        if self.trust is not None:
            return {id_: key for id_, key in fitting if id_ in self.trust}
        return dict(random.sample(fitting, min(MAX_CANDIDATES, len(fitting))))

    # ------------------------------------------------------------------ tasks
    def submit(self, task: dict[str, Any], watch: Watch) -> None:
        """Put ``task`` (a v2 task, validated) on the market; its answer feeds ``watch``.
        The private fields are sealed under a fresh task key, granted to the candidates."""
        tid = task[TaskField.ID]
        candidates = self._candidates(task)
        prompt_bytes = len(json.dumps(task, ensure_ascii=False).encode())
        fields = {
            Header.ID: tid,
            Header.MODEL: task.get(TaskField.MODEL) or ANY_MODEL,
            Header.MAX_TOKENS: task.get(TaskField.MAX_TOKENS),
            Header.PROMPT_BYTES: prompt_bytes,
            Header.MAX_PRICE: self.max_price(task, prompt_bytes),
            Header.DATE: task[TaskField.DATE],
            Header.DEADLINE: task[TaskField.DEADLINE],
            Header.NEEDS: sorted(required(task)),
            Header.KEY: self._enc_key,
            Header.CANDIDATES: sorted(candidates) or None,
        }
        if self.trust is not None:  # all of them: one that comes later may take the task
            fields[Header.CANDIDATES] = sorted(self.trust)
            fields[Header.CANDIDATES_ONLY] = True
        header = sign_header(self.identity, {k: v for k, v in fields.items() if v is not None})
        hashed = header_hash(header)
        key = new_task_key()
        grants = seal_grants(key, header, candidates, hashed)
        granted = {w: bytes(pk) for w, pk in candidates.items()}
        self._tracks[tid] = Track(watch, task, header, hashed, key, granted)
        prompt = self.session.own(prompt_doc(self.id, tid), new=True)  # tid: made now
        with prompt.transaction():
            fields_map = prompt.get(PROMPT, type=Map)
            fields_map[CIPHERTEXT] = seal_prompt(key, tid, self.id, private_part(task))
            fields_map[GRANTS] = Map(grants)
        self._asker.get(TASKS, type=Map)[tid] = header

    # ------------------------------------------------------------------ credits
    def _params(self, worker: str, model: str) -> str:
        raw = self._listed().get(worker)
        return pricing.model_params(raw.get("models") if isinstance(raw, dict) else None, model)

    def prices(self) -> dict[str, Any] | None:
        """The price rule the market publishes (``dir.market.prices``); None in a market
        that counts no credits. Read again only once ``dir`` changed (never to be
        changed: it is shared)."""
        if self._prices is None:
            market = self._dir.get("market", type=Map).get("prices") if self._dir else None
            if isinstance(market, Map):
                market = market.to_py()
            self._prices = (market if isinstance(market, dict) else None,)
        return self._prices[0]

    def price_of(self, worker: str, model: str, prompt_tokens: int, tokens: int) -> int | None:
        """A run's price by the published rule, at the size ``worker`` advertises for
        ``model`` (the figure its receipt would sign); None without a rule."""
        try:
            return pricing.published_price(
                self.prices(), prompt_tokens, tokens, self._params(worker, model)
            )
        except pricing.PriceError:
            return None

    def max_price(self, task: dict[str, Any], prompt_bytes: int | None = None) -> int:
        """The most ``task`` may cost (its header's ``maxPrice``, the gateway's estimate):
        at the largest size a worker of ``dir`` advertises for its model."""
        if prompt_bytes is None:
            prompt_bytes = len(json.dumps(task, ensure_ascii=False).encode())
        model = task.get(TaskField.MODEL) or ANY_MODEL
        tops = self._from_dir().tops
        top = tops.get(model)
        if top is None:
            sizes = [self._params(w, model) for w in self._listed()] or [pricing.DEFAULT_PARAMS]
            top = tops[model] = max(sizes, key=pricing.factor)
        tokens = number(task.get(TaskField.MAX_TOKENS))
        return pricing.max_price(prompt_bytes, int(tokens or CONSENT_TOKENS), top)

    async def balance(self) -> int | None:
        """This identity's balance in the market's ledger (millicredits), None if the
        market does not answer within BALANCE_WAIT (or counts no credits)."""
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._balances.append(future)
        if not self._ask_balance():
            self._balances.remove(future)
            return None
        try:
            return await within(future, BALANCE_WAIT)
        except TimeoutError:
            return None
        finally:
            if future in self._balances:
                self._balances.remove(future)

    def recent_balance(self, fresh: float | None = None) -> int | None:
        """The balance the market last answered, if that was less than ``fresh`` seconds
        (BALANCE_FRESH) ago, else None (then ``balance()`` asks). An answer older than
        half of that is asked again without waiting: steady requests find a recent one."""
        fresh = BALANCE_FRESH if fresh is None else fresh
        if self._known is None:
            return None
        value, at = self._known
        now = time.monotonic()
        if now - at >= fresh:
            return None
        if now - at >= fresh / 2 and now - self._asked >= fresh / 2 and self._ask_balance():
            self._unwaited += 1
        return value

    def _ask_balance(self) -> bool:
        self._asked = time.monotonic()
        return self.session.control({"op": "balance", "id": self.id})

    def _credits_notice(self, event: Event) -> None:
        body = notice_answer(event.text, "balance")
        if body is None or body.get("id") != self.id:  # the session's other askers ask too
            return
        value = body.get("balance")
        if isinstance(value, int):
            self._known = (value, time.monotonic())
        # Answers come in the order asked: counted first against recent_balance's
        # questions, a waiter's answer was asked no earlier than its own question.
        if self._unwaited:
            self._unwaited -= 1
        elif self._balances:
            future = self._balances.pop(0)
            if not future.done() and isinstance(value, int):
                future.set_result(value)

    def _sign(self, tid: str, track: Track, usage: dict[str, int]) -> int | None:
        """The receipt of a run read whole (its final chunk checked): written in the
        prompt document, where the worker reads it (credits.md §3). Returns its price
        (what the market settles from it), None when none was signed."""
        doc = self.session.docs.get(prompt_doc(self.id, tid))
        if not self.receipts or doc is None or track.worker is None or not self.session.market:
            return None
        if self.worker_key(track.worker) is None:
            # Its advert is not in dir (a market that restarted lists the workers again
            # as they come back): priced without it (DEFAULT_PARAMS), the receipt would be
            # refused (wrong_price). None then: the worker's claim without receipt stands.
            log.info("task %s: no receipt: the advert of %s is not in dir", tid, track.worker[:8])
            return None
        try:
            receipt = Receipt.make(
                self.identity,
                self.session.market,
                track.header,
                track.attempt,
                track.worker,
                int(usage.get(TaskField.PROMPT_TOKENS, 0)),
                int(usage.get(TaskField.COMPLETION_TOKENS, 0)),
                track.run.value(),
                self._params(track.worker, str(track.header.get(Header.MODEL))),
                track.hashed,
            )
        except (ClaimError, pricing.PriceError) as exc:
            log.warning("task %s: no receipt signed: %s", tid, exc)
            return None
        doc.get(RECEIPTS, type=Map)[str(track.attempt)] = receipt.written()
        return receipt.price

    def _grant(self, tid: str, track: Track, worker: str) -> None:
        """The late grant (protocol-v3.md §7.2): the broker chose a worker the task key
        was not sealed to, or sealed to a session key it no longer has (it restarted);
        seal it now, once its advert is in ``dir`` and checks. Never to a worker outside
        the trust list: a broker that chose one ends the task (``_untrusted``)."""
        if self.trust is not None and worker not in self.trust:
            self._untrusted(tid, track, worker)
            return
        key = self.worker_key(worker)
        if key is None:
            log.debug("task %s: waiting for the advert of %s to grant it", tid, worker[:8])
            return  # tried again when dir changes
        if track.granted.get(worker) == bytes(key):
            return
        doc = self.session.docs.get(prompt_doc(self.id, tid))
        if doc is None:
            return
        grants = doc.get(PROMPT, type=Map).get(GRANTS)
        if isinstance(grants, Map):
            grants[worker] = seal_grant(track.key, track.header, key, track.hashed)
            track.granted[worker] = bytes(key)

    def _untrusted(self, tid: str, track: Track, worker: str) -> None:
        """The broker assigned ``tid`` to a worker the asker does not trust (it ignored
        ``candidatesOnly``): the task key stays sealed from it, the task stops and fails."""
        if tid in self._ended:
            return
        log.warning(
            "task %s: the broker assigned it to worker %s, which is not a trusted worker: "
            "no key to its prompt was sealed to it; the task is stopped",
            tid,
            worker[:8],
        )
        self.abort(tid)
        final = {
            **track.task,
            TaskField.STATE: StatusState.FAILED.value,
            TaskField.ERROR: (
                f"the broker assigned it to worker {worker}, which is not one of the trusted "
                "workers: no key to its prompt was sealed to it"
            ),
            TaskField.ERROR_CODE: ErrorCode.UNTRUSTED_WORKER.value,
            TaskField.END: now_ms(),
            TaskField.RESPONSE: "",
        }
        self._end(tid, track, final)

    def abort(self, tid: str) -> None:
        """Ask the worker (``p/…abort``) and the broker (``a/….aborts``) to stop it."""
        if tid not in self._tracks or tid in self._ended:
            return
        self.session.own(prompt_doc(self.id, tid)).get(PROMPT, type=Map)[ABORT] = True
        self._asker.get(ABORTS, type=Map)[tid] = True

    def forget(self, tid: str) -> None:
        """The answer was read (or given up): the task's documents and entries go."""
        track = self._tracks.pop(tid, None)
        self._ended.discard(tid)
        with self._asker.transaction():
            for key in (TASKS, ABORTS):
                entries = self._asker.get(key, type=Map)
                if tid in entries:
                    del entries[tid]
        name = prompt_doc(self.id, tid)
        if name in self.session.docs:
            self.session.drop(name)
        if track is not None and track.worker:
            run = run_doc(track.worker, tid, track.attempt)
            if run in self.session.docs:
                self.session.unsubscribe(run)

    # ------------------------------------------------------------------ reading
    def _on_event(self, event: Event) -> None:
        if event.kind is EventKind.NOTICE and event.code == Code.CREDITS:
            self._credits_notice(event)
            return
        if event.kind is EventKind.CONNECTED:
            self._unwaited = 0  # questions of the connection before are not answered
            if self.id in self.session.granted:  # refused while not admitted: read it now
                self.session.subscribe(inbox(self.id))
                self._watch_inbox()
            else:
                self._not_admitted()
            return
        if event.kind is not EventKind.CHANGED:
            return  # a NEW document is followed by its CHANGED at once: read once, then
        name = event.name
        if name == inbox(self.id):
            self._watch_inbox()  # a new epoch is a new Doc
            changed, self._statuses_changed = self._statuses_changed, set()
            for tid in changed:
                if tid in self._tracks:
                    self._status(tid)
        elif name == "dir":  # an advert came: a grant or a reader may wait for it
            self._dir_read = self._prices = None
            for tid, track in list(self._tracks.items()):
                if track.worker:  # a grant (or a new one) or the reader may wait for it
                    self._status(tid)
                    if tid in self._tracks:
                        self._run(tid)
        elif name.startswith("r/"):
            tid = name.split("/")[2].partition(".")[0]
            if tid in self._tracks:
                self._run(tid)

    def _status(self, tid: str) -> None:
        track = self._tracks[tid]
        if tid in self._ended or self._inbox is None:
            return
        status = self._inbox.get(TASKS, type=Map).get(tid)
        if not isinstance(status, dict):
            return
        state = status.get(Status.STATE)
        attempt = int(number(status.get(Status.ATTEMPT)) or 0)
        if state == StatusState.ASSIGNED.value and attempt > track.attempt:
            worker = status.get(Status.WORKER)
            if not isinstance(worker, str):
                return
            if track.worker:  # the previous attempt's run is read no more
                old = run_doc(track.worker, tid, track.attempt)
                if old in self.session.docs:
                    self.session.unsubscribe(old)
            track.worker, track.attempt, track.read, track.reader = worker, attempt, 0, None
            track.run = RunHash()
            track.watch.feed(attempt, "")
            self._grant(tid, track, worker)
            self._run(tid)
        elif state == StatusState.ASSIGNED.value and track.worker:
            self._grant(tid, track, track.worker)  # if its advert was missing before
        elif state in (StatusState.FAILED.value, StatusState.ABORTED.value):
            final = {
                **track.task,
                TaskField.STATE: state,
                TaskField.ERROR: status.get(Status.ERROR),
                TaskField.ERROR_CODE: status.get(Status.ERROR_CODE),
                TaskField.END: status.get(Status.END) or now_ms(),
                TaskField.RESPONSE: track.watch.delivered,
            }
            self._end(tid, track, final)

    def _run(self, tid: str) -> None:
        track = self._tracks[tid]
        if tid in self._ended or not track.worker:
            return
        doc = self.session.docs.get(run_doc(track.worker, tid, track.attempt))
        if doc is None:
            return
        with doc.transaction():  # one for every read below, not one per read
            final = self._ran(tid, track, doc)
        if final is not None:
            final[TaskField.RESPONSE] = track.watch.delivered
            self._end(tid, track, final)

    def _ran(self, tid: str, track: Track, doc: Doc[Any]) -> dict[str, Any] | None:
        """The chunks of the run not read yet fed to the watch; the task's final state
        once the run ended, else None."""
        run = doc.get(RUN, type=Map)
        state = run.get(RunField.STATE)
        try:
            last = self._read(tid, track, doc.get(CHUNKS, type=Array), run.get(RunField.SALT))
            if state not in FINAL_RUNS:
                return None
            final = {**track.task, TaskField.STATE: state, TaskField.WORKER: track.worker}
            for field_ in (RunField.ERROR, RunField.ERROR_CODE, RunField.END):
                value = run.get(field_)
                if value is not None:
                    final[field_] = value
            if state == RunState.DONE.value:
                final.update(self._answer(tid, track, last, run.get(RunField.USAGE)))
                price = self._sign(tid, track, final[TaskField.USAGE] or {})
                if price is not None and self.prices() is not None:  # a market with credits
                    final[TaskField.PRICE] = price
        except CryptoError as exc:
            log.warning("task %s: %s", tid, exc)
            final = {
                **track.task,
                TaskField.STATE: StatusState.FAILED.value,
                TaskField.WORKER: track.worker,
                TaskField.ERROR: str(exc),
                TaskField.ERROR_CODE: ErrorCode.UNREADABLE.value,
                TaskField.END: now_ms(),
            }
        return final

    def _read(self, tid: str, track: Track, chunks: Array[Any], salt: Any) -> Final | None:
        """Open the chunks not read yet, feeding their text to the watch; the final
        chunk's content once it came. Nothing is read before the run's salt and the
        worker's advert are here."""
        assert track.worker is not None
        if track.reader is None:
            worker_key = self.worker_key(track.worker)
            if not isinstance(salt, (bytes, bytearray)) or worker_key is None:
                return None
            answer_key = asker_answer_key(
                track.key, self._session_key, worker_key, track.attempt, bytes(salt)
            )
            track.reader = AnswerReader(answer_key, tid, track.attempt)
        size = len(chunks)
        text: list[str] = []
        while track.read < size:
            chunk = chunks[track.read]
            track.read += 1
            if not isinstance(chunk, (bytes, bytearray)):
                raise CryptoError(f"run {tid}.{track.attempt}: chunk {track.read - 1} is not bytes")
            raw = bytes(chunk)
            track.run.update(raw)
            opened = track.reader.feed(raw)
            text.append(opened.text if isinstance(opened, Final) else opened)
        track.watch.feed(track.attempt, "".join(text))
        return track.reader.final

    def _answer(self, tid: str, track: Track, final: Final | None, usage: Any) -> dict[str, Any]:
        """The results of a run done: from its final chunk, whose usage must be the run's
        usage in clear (what the broker and credits read)."""
        if track.reader is None:
            raise CryptoError(f"run {tid}.{track.attempt} is done but has no salt or no advert")
        final = track.reader.end()
        clear = {k: number(v) for k, v in usage.items()} if isinstance(usage, dict) else None
        if clear != final.usage:
            raise CryptoError(
                f"run {tid}.{track.attempt}: its usage in clear {clear} is not its final "
                f"chunk's {final.usage}"
            )
        return {
            TaskField.FINISH_REASON: final.finish_reason,
            TaskField.USAGE: final.usage,
            **final.results,
        }

    def _not_admitted(self) -> None:
        """The market no longer admits this identity (banned or removed while its tasks
        ran, on a connection proving several: a gateway's): its tasks in flight end now,
        their waiters told why (``NOT_ADMITTED``), rather than wait for their timeout."""
        why = f"the market no longer admits the identity {self.id} (banned or removed)"
        for tid, track in list(self._tracks.items()):
            if tid not in self._ended:
                log.warning("task %s: %s", tid, why)
                final = {
                    **track.task,
                    TaskField.STATE: StatusState.FAILED.value,
                    TaskField.ERROR: why,
                    TaskField.END: now_ms(),
                    NOT_ADMITTED: self.id,
                }
                self._end(tid, track, final)

    def _end(self, tid: str, track: Track, final: dict[str, Any]) -> None:
        self._ended.add(tid)
        track.watch.ended = True
        track.watch.queue.put_nowait(final)
