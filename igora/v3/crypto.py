"""End-to-end encryption of a v3 task's prompt and answer (docs/security.md §6).

Pure functions over bytes, for the roles to call: the asker makes a task key ``K``,
encrypts the private fields of its task (``seal_prompt``) and seals ``K`` to each worker
it trusts (``seal_grant``); the worker opens its grant against the header it was assigned
(``open_grant``) and the prompt (``open_prompt``). Both sides derive the run's answer
key from ``K`` and a Diffie-Hellman of their session keys (``worker_answer_key``,
``asker_answer_key``); the worker writes chunks with an ``AnswerWriter``, the asker
opens them with an ``AnswerReader``. Every failure is a ``CryptoError`` subclass that
says what failed.

Only libsodium through PyNaCl: XChaCha20-Poly1305 (IETF AEAD), BLAKE2b keyed
(``crypto_generichash``), sealed boxes, X25519. Every input to a key derivation or an
AD is a list of parts, each prefixed with its length (``frame``), so that no two
different lists give the same bytes.
"""

from __future__ import annotations

import functools
import hmac
import json
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import nacl.bindings as sodium
import nacl.exceptions
import nacl.utils
from nacl.public import PublicKey, SealedBox

from ..errors import IgoraError
from ..identity import SessionKey, unb64url
from ..protocol import TaskField
from .header import HeaderError, header_hash, verify_header

KEY_BYTES = 32
SALT_BYTES = 16
NONCE_BYTES = 24  # XChaCha20
TAG_BYTES = 16  # Poly1305
HASH_BYTES = 32  # BLAKE2b-256, the header hash

PROMPT_AD = b"igora3-prompt"
ANSWER_AD = b"igora3-answer"
PROMPT_KEY = b"prompt"
ANSWER_KEY = b"answer"

PRIVATE_FIELDS = frozenset(
    (
        TaskField.SYSTEM_PROMPT,
        TaskField.PROMPT,
        TaskField.MESSAGES,
        TaskField.TEMPERATURE,
        TaskField.TOP_P,
        TaskField.SEED,
        TaskField.STOP,
        TaskField.TOOLS,
        TaskField.TOOL_CHOICE,
        TaskField.RESPONSE_FORMAT,
        TaskField.N,
        TaskField.LOGPROBS,
        TaskField.TOP_LOGPROBS,
        TaskField.INPUTS,
        TaskField.DIMENSIONS,
        TaskField.KIND,  # for the worker; the header's ``needs`` says as much to the broker
    )
)
"""The request fields that travel inside ``ct`` (security.md §6): content, sampling and
options. What matching needs (model, ``maxTokens``, deadline, the capabilities needed) is in
the header, in clear."""

FINAL_FIELDS = frozenset(
    (
        TaskField.FINISH_REASON,
        TaskField.USAGE,
        TaskField.TOOL_CALLS,
        TaskField.LOGPROBS_RESULT,
        TaskField.CHOICES,
        TaskField.EMBEDDINGS,
    )
) | {"text"}
"""What a final chunk's object may hold: ``text``, ``finishReason`` and ``usage`` always,
and the v2 results a task asked for."""

_SEARCH = 64  # indices either side of the expected one tried to name a misplaced chunk


class CryptoError(IgoraError):
    """Something encrypted for a task does not open or does not belong where it was found."""


class PromptError(CryptoError):
    """A task's ``ct`` does not open under its key, task and asker, or holds no prompt."""


class GrantError(CryptoError):
    """A grant that this worker cannot open, or that was made for another task or header."""


class KeyAgreementError(CryptoError):
    """A session key that gives no shared secret (a low-order point) or bad key sizes."""


class AnswerError(CryptoError):
    """A run's answer chunks do not read as one whole answer from this run's worker."""


class ChunkOrderError(AnswerError):
    """A chunk that is authentic but not at its place: reordered, repeated or after a
    gap (``expected`` and ``found`` are indices)."""

    def __init__(self, message: str, expected: int, found: int) -> None:
        super().__init__(message)
        self.expected = expected
        self.found = found


class ChunkAuthError(AnswerError):
    """A chunk that opens under this run's key at no nearby index: altered, or written
    under another answer key (another worker, run, attempt or salt). AEAD cannot tell
    these apart, and the answer fails the same way for each."""


class TruncatedAnswer(AnswerError):
    """The run ended without a final chunk that opens: the answer was cut short."""


class ChunkAfterFinal(AnswerError):
    """A chunk after the final one."""


class BadFinal(AnswerError):
    """A final chunk that opens but is not ``{"text", "finishReason", "usage", ...}``."""


# --- encoding ----------------------------------------------------------------------


def frame(*parts: bytes) -> bytes:
    """Each part prefixed with its length (4 bytes, big-endian), concatenated."""
    return b"".join(len(p).to_bytes(4, "big") + p for p in parts)


def u64(value: int) -> bytes:
    if type(value) is not int or not 0 <= value < 2**64:
        raise CryptoError(f"{value!r} is not a whole number from 0 to 2^64 - 1")
    return value.to_bytes(8, "big")


def _text(value: str, what: str) -> bytes:
    if not isinstance(value, str):
        raise CryptoError(f"{what} must be a string")
    try:
        return value.encode("utf-8")
    except UnicodeEncodeError:
        raise CryptoError(f"{what} is not UTF-8 (a lone surrogate)") from None


def _json(obj: dict[str, Any], what: str) -> bytes:
    """Compact JSON, keys sorted, UTF-8. Not ``protocol.canonical``: these objects are
    neither signed nor hashed (the AEAD tag protects them), and they hold fractions
    (``temperature``, log probabilities) that canonical JSON refuses."""
    try:
        text = json.dumps(
            obj, separators=(",", ":"), sort_keys=True, ensure_ascii=False, allow_nan=False
        )
        return text.encode("utf-8")
    except (TypeError, ValueError) as exc:
        raise CryptoError(f"{what} is not JSON: {exc}") from None


def _parse(data: bytes, what: str, error: type[CryptoError]) -> dict[str, Any]:
    try:
        obj = json.loads(data.decode("utf-8"), parse_constant=_no_constant)
    except (UnicodeDecodeError, ValueError) as exc:
        raise error(f"{what} is not JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise error(f"{what} is not a JSON object")
    return obj


def _no_constant(name: str) -> float:
    raise ValueError(f"{name} is not JSON")


def _key(key: bytes, what: str = "task key") -> bytes:
    if not isinstance(key, bytes) or len(key) != KEY_BYTES:
        raise CryptoError(f"a {what} is {KEY_BYTES} bytes")
    return key


# --- keys ----------------------------------------------------------------------------


def new_task_key() -> bytes:
    """A fresh random task key ``K`` (32 bytes, libsodium's ``randombytes``)."""
    return nacl.utils.random(KEY_BYTES)


def new_salt() -> bytes:
    """A fresh 16-byte salt for a run's answer key."""
    return nacl.utils.random(SALT_BYTES)


def derive(key: bytes, label: bytes, *inputs: bytes) -> bytes:
    """``H(K, label ‖ inputs)``: BLAKE2b-256 keyed with ``key`` over ``frame(label,
    *inputs)``."""
    return sodium.crypto_generichash_blake2b_salt_personal(
        frame(label, *inputs), digest_size=32, key=_key(key)
    )


def _aead_seal(key: bytes, nonce: bytes, ad: bytes, plaintext: bytes) -> bytes:
    return sodium.crypto_aead_xchacha20poly1305_ietf_encrypt(plaintext, ad, nonce, key)


def _aead_open(key: bytes, nonce: bytes, ad: bytes, ciphertext: bytes) -> bytes | None:
    try:
        return sodium.crypto_aead_xchacha20poly1305_ietf_decrypt(ciphertext, ad, nonce, key)
    except nacl.exceptions.CryptoError:
        return None


# --- the prompt ----------------------------------------------------------------------


def private_part(task: dict[str, Any]) -> dict[str, Any]:
    """The fields of a v2-shaped task that ``seal_prompt`` encrypts."""
    return {k: v for k, v in task.items() if k in PRIVATE_FIELDS}


def _prompt_ad(tid: str, asker: str) -> bytes:
    return frame(PROMPT_AD, _text(tid, "task id"), _text(asker, "asker id"))


def seal_prompt(key: bytes, tid: str, asker: str, fields: dict[str, Any]) -> bytes:
    """``ct`` of task ``tid`` of ``asker``: a random 24-byte nonce, then the private
    ``fields`` as JSON under ``K_p = H(K, "prompt")``. Fields outside ``PRIVATE_FIELDS``
    are refused (CryptoError): what is not private belongs in the header."""
    if not isinstance(fields, dict):
        raise CryptoError("the private fields are a JSON object")
    extra = sorted(set(fields) - PRIVATE_FIELDS)
    if extra:
        raise CryptoError(f"not private task fields (they go in the header): {', '.join(extra)}")
    nonce = nacl.utils.random(NONCE_BYTES)
    plaintext = _json(fields, "the private fields")
    return nonce + _aead_seal(derive(key, PROMPT_KEY), nonce, _prompt_ad(tid, asker), plaintext)


def open_prompt(key: bytes, tid: str, asker: str, ct: bytes) -> dict[str, Any]:
    """The private fields in ``ct``; PromptError if it does not open under ``key`` for
    task ``tid`` of ``asker`` (another key, task or asker, or altered), or holds no JSON
    object."""
    if not isinstance(ct, bytes) or len(ct) < NONCE_BYTES + TAG_BYTES:
        raise PromptError(f"the prompt of task {tid} is too short to be a ciphertext")
    plaintext = _aead_open(
        derive(key, PROMPT_KEY), ct[:NONCE_BYTES], _prompt_ad(tid, asker), ct[NONCE_BYTES:]
    )
    if plaintext is None:
        raise PromptError(
            f"the prompt of task {tid} does not open: another task key, task or asker, or altered"
        )
    return _parse(plaintext, f"the prompt of task {tid}", PromptError)


# --- grants --------------------------------------------------------------------------


def _header_digest(header: dict[str, Any], hashed: str | None = None) -> bytes:
    return unb64url(header_hash(header) if hashed is None else hashed, HASH_BYTES, "header hash")


def seal_grant(
    key: bytes, header: dict[str, Any], worker_key: PublicKey, hashed: str | None = None
) -> bytes:
    """A grant of task key ``key`` to the worker whose session key is ``worker_key``
    (checked by the caller with ``verify_session_key``): a sealed box of ``K (32) ‖
    H(header) (32) ‖ tid``, 128 bytes for a 16-character task id. ``hashed``: the
    header's ``header_hash``, when the caller has it already."""
    return SealedBox(worker_key).encrypt(_grant_plaintext(key, header, hashed))


def seal_grants(
    key: bytes,
    header: dict[str, Any],
    worker_keys: dict[str, PublicKey],
    hashed: str | None = None,
) -> dict[str, bytes]:
    """``seal_grant`` to each worker of ``worker_keys`` (id -> session key), the
    header's hash computed once (or given: ``hashed``)."""
    plaintext = _grant_plaintext(key, header, hashed) if worker_keys else b""
    return {w: SealedBox(pk).encrypt(plaintext) for w, pk in worker_keys.items()}


def _grant_plaintext(key: bytes, header: dict[str, Any], hashed: str | None = None) -> bytes:
    tid = header.get("id") if isinstance(header, dict) else None
    if not isinstance(tid, str):
        raise CryptoError("a grant needs a header with its task id")
    return _key(key) + _header_digest(header, hashed) + _text(tid, "task id")


class Granted(NamedTuple):
    """What an open grant gives its worker."""

    key: bytes  # the task key
    header: str  # the header's hash (``header_hash``), as checked: its receipt's ``header``


def open_grant(session: SessionKey, grant: bytes, header: dict[str, Any]) -> Granted:
    """The task key in ``grant``, for the worker holding ``session`` that was assigned
    ``header``, with the header's hash. GrantError if the header is not signed by its
    asker, the grant was sealed to another key or altered, or it was made for another
    task or another header."""
    try:
        hashed = verify_header(header)
    except HeaderError as exc:
        raise GrantError(f"grant refused: {exc}") from None
    tid = header["id"]
    try:
        plaintext = SealedBox(session.private_key).decrypt(grant)
    except (nacl.exceptions.CryptoError, TypeError, ValueError):
        raise GrantError(
            f"the grant for task {tid} does not open with our session key: "
            "sealed to another worker, or altered"
        ) from None
    if len(plaintext) <= KEY_BYTES + HASH_BYTES:
        raise GrantError(f"the grant for task {tid} is too short")
    key = plaintext[:KEY_BYTES]
    digest = plaintext[KEY_BYTES : KEY_BYTES + HASH_BYTES]
    granted = plaintext[KEY_BYTES + HASH_BYTES :]
    if not hmac.compare_digest(granted, tid.encode("ascii")):
        shown = granted[:40].decode("utf-8", "replace")
        raise GrantError(f"the grant is for task {shown!r}, not for task {tid}")
    if not hmac.compare_digest(digest, _header_digest(header, hashed)):
        raise GrantError(f"the grant for task {tid} was made for another header of that task")
    return Granted(key, hashed)


# --- the answer ----------------------------------------------------------------------


def _shared(mine: SessionKey, theirs: PublicKey) -> bytes:
    return _scalarmult(bytes(mine.private_key), bytes(theirs))


@functools.lru_cache(maxsize=1024)
def _scalarmult(secret: bytes, public: bytes) -> bytes:
    """X25519, remembered per pair: every task between one asker's and one worker's
    session keys would repeat it (~0.1 ms each side). Session keys live in memory only,
    as this cache does."""
    try:
        return sodium.crypto_scalarmult(secret, public)
    except (nacl.exceptions.CryptoError, RuntimeError, TypeError, ValueError):
        raise KeyAgreementError(
            "the peer's session key gives no shared secret (a low-order point)"
        ) from None


def _answer_key(
    key: bytes, s: bytes, asker: PublicKey, worker: PublicKey, n: int, salt: bytes
) -> bytes:
    if not isinstance(salt, bytes) or len(salt) != SALT_BYTES:
        raise CryptoError(f"a run's salt is {SALT_BYTES} bytes")
    return derive(key, ANSWER_KEY, s, bytes(asker), bytes(worker), u64(n), salt)


def worker_answer_key(
    key: bytes, session: SessionKey, asker: PublicKey, n: int, salt: bytes
) -> bytes:
    """``K_a`` of run ``n`` for the worker: ``H(K, "answer" ‖ X25519(our session secret,
    the header's asker key) ‖ asker key ‖ our key ‖ n ‖ salt)``."""
    return _answer_key(key, _shared(session, asker), asker, session.public_key, n, salt)


def asker_answer_key(
    key: bytes, session: SessionKey, worker: PublicKey, n: int, salt: bytes
) -> bytes:
    """``K_a`` of run ``n`` for the asker, ``worker`` being the session key of the
    worker's advert checked with ``verify_session_key``: the same key as the worker's."""
    return _answer_key(key, _shared(session, worker), session.public_key, worker, n, salt)


def _chunk_nonce(i: int) -> bytes:
    return u64(i) + bytes(NONCE_BYTES - 8)


def _chunk_ad(tid: str, n: int, i: int, final: bool) -> bytes:
    return frame(ANSWER_AD, _text(tid, "task id"), u64(n), u64(i), b"\x01" if final else b"\x00")


def seal_chunk(answer_key: bytes, tid: str, n: int, i: int, plaintext: bytes, final: bool) -> bytes:
    """Chunk ``i`` of run ``(tid, n)``: ``plaintext`` under ``K_a``, nonce ``i`` (8 bytes
    big-endian) then 16 zero bytes. Safe only if ``K_a`` writes each ``i`` once: use
    an ``AnswerWriter``."""
    return _aead_seal(
        _key(answer_key, "answer key"), _chunk_nonce(i), _chunk_ad(tid, n, i, final), plaintext
    )


def open_chunk(
    answer_key: bytes, tid: str, n: int, i: int, chunk: bytes, final: bool
) -> bytes | None:
    """The plaintext of ``chunk`` if it is chunk ``i`` (final or not, as given) of run
    ``(tid, n)`` under ``K_a``; None otherwise."""
    if not isinstance(chunk, bytes) or len(chunk) < TAG_BYTES:
        return None
    return _aead_open(
        _key(answer_key, "answer key"), _chunk_nonce(i), _chunk_ad(tid, n, i, final), chunk
    )


@dataclass
class AnswerWriter:
    """The worker's side of one run: chunks 0, 1, 2, ... then one final chunk. Each index
    is written once, so no nonce repeats under ``K_a`` (fresh per run by its salt)."""

    answer_key: bytes
    tid: str
    n: int
    next: int = 0
    closed: bool = field(default=False, init=False)

    def piece(self, text: str) -> bytes:
        """The next chunk, holding ``text`` (UTF-8)."""
        return self._seal(_text(text, "a piece"), final=False)

    def final(self, text: str, finish_reason: str, usage: dict[str, int], **results: Any) -> bytes:
        """The final chunk: ``{"text", "finishReason", "usage"}`` and any v2 results
        (``toolCalls``, ``tokenLogprobs``, ``choices``, ``embeddings``); no chunk after it."""
        obj = {"text": text, "finishReason": finish_reason, "usage": usage, **results}
        extra = sorted(set(obj) - FINAL_FIELDS)
        if extra:
            raise CryptoError(f"not answer fields: {', '.join(extra)}")
        return self._seal(_json(obj, "the final chunk"), final=True)

    def _seal(self, plaintext: bytes, final: bool) -> bytes:
        if self.closed:
            raise CryptoError(f"run {self.tid}.{self.n} already has its final chunk")
        chunk = seal_chunk(self.answer_key, self.tid, self.n, self.next, plaintext, final)
        self.next += 1
        self.closed = final
        return chunk


@dataclass(frozen=True)
class Final:
    """What the final chunk says."""

    text: str
    finish_reason: str
    usage: dict[str, int]
    results: dict[str, Any]  # toolCalls, tokenLogprobs, choices, embeddings if any


@dataclass
class AnswerReader:
    """The asker's side of one run: ``feed`` each chunk in the run's order, from index
    ``start`` (0, or where a reader that reconnected takes up again); ``end`` when the run
    says it is done. Each refusal is an ``AnswerError`` subclass naming what failed."""

    answer_key: bytes
    tid: str
    n: int
    next: int = 0
    final: Final | None = field(default=None, init=False)

    def feed(self, chunk: bytes) -> str | Final:
        """The text of the next chunk, or the ``Final`` if it is the last one."""
        if self.final is not None:
            raise ChunkAfterFinal(
                f"run {self._run}: a chunk after the final one (index {self.next})"
            )
        i = self.next
        for final in (False, True):
            plaintext = open_chunk(self.answer_key, self.tid, self.n, i, chunk, final)
            if plaintext is not None:
                self.next += 1
                return self._final(plaintext) if final else self._piece(plaintext, i)
        found = self._locate(chunk)
        if found is None:
            raise ChunkAuthError(
                f"run {self._run}: chunk {i} does not open under this run's answer key: "
                "altered, or written by another worker, run or attempt"
            )
        what = "repeated" if found < i else "after a gap"
        raise ChunkOrderError(
            f"run {self._run}: chunk {found} arrived where chunk {i} belongs ({what})", i, found
        )

    def end(self) -> Final:
        """The final chunk's content, once the run is done; TruncatedAnswer if none came."""
        if self.final is None:
            raise TruncatedAnswer(
                f"run {self._run} ended after {self.next} chunks without a final chunk that opens"
            )
        return self.final

    @property
    def _run(self) -> str:
        return f"{self.tid}.{self.n}"

    def _piece(self, plaintext: bytes, i: int) -> str:
        try:
            return plaintext.decode("utf-8")
        except UnicodeDecodeError:
            raise BadFinal(f"run {self._run}: chunk {i} is not UTF-8") from None

    def _final(self, plaintext: bytes) -> Final:
        obj = _parse(plaintext, f"run {self._run}: the final chunk", BadFinal)
        text, reason, usage = obj.get("text"), obj.get("finishReason"), obj.get("usage")
        if not isinstance(text, str) or not isinstance(reason, str):
            raise BadFinal(f"run {self._run}: the final chunk has no text or finishReason")
        if not isinstance(usage, dict) or not all(
            isinstance(k, str) and type(v) is int and v >= 0 for k, v in usage.items()
        ):
            raise BadFinal(f"run {self._run}: the final chunk's usage is not token counts")
        results = {
            k: v for k, v in obj.items() if k in FINAL_FIELDS - {"text", "finishReason", "usage"}
        }
        self.final = Final(text, reason, usage, results)
        return self.final

    def _locate(self, chunk: bytes) -> int | None:
        """The index near the expected one at which ``chunk`` opens, if any."""
        for j in range(max(0, self.next - _SEARCH), self.next + _SEARCH + 1):
            if j == self.next:
                continue
            for final in (False, True):
                if open_chunk(self.answer_key, self.tid, self.n, j, chunk, final) is not None:
                    return j
        return None
