"""Figures behind the version 3 design (docs/protocol-v3.md, docs/security.md).

Not part of ``make bench``: a one-off measurement of the building blocks, in one process,
no network. Run: ``python -m bench.v3_costs`` (PyNaCl needed for the crypto part:
``pip install pynacl``).

1. The market applying a small update (one stream piece) to a room (version 2: one
   document) as the number of tasks in it and of answers streamed at once grow.
2. The market keeping a document as its update log only (no ``Doc``): append, merge for
   a newcomer, diff against a state vector.
3. Memory of many small documents against one big one.
4. Bytes of a stream piece: ``Y.Text`` append (today) against an encrypted chunk appended
   to a ``Y.Array`` of bytes (version 3).
5. Bytes of the version 3 updates of one task.
6. The market's work per incoming update, v2 against a v3 sketch (no socket).
7. Crypto per task and per chunk (Ed25519, sealed box, XChaCha20-Poly1305).
8. The same through ``igora.v3.crypto`` as the roles call it: grant, prompt, answer key,
   chunks. ``python -m bench.v3_costs crypto`` runs 7 and 8 only.
"""

from __future__ import annotations

import gc
import multiprocessing
import os
import statistics
import sys
import time
from collections import deque
from collections.abc import Callable

from pycrdt import (
    Array,
    Doc,
    Map,
    Text,
    create_update_message,
    get_state,
    get_update,
    merge_updates,
)

from igora.lib0 import Reader, uint_bytes
from igora.market.frames import check_frame

TASK = {
    "id": "x" * 16,
    "asker": "a" * 43,
    "state": "doing",
    "model": "smollm2-135m",
    "maxTokens": 256,
    "date": 1764460000000,
    "worker": "w" * 43,
    "attemps": 1,
    "start": 1764460000010,
    "stream": "x" * 16 + "#1",
}


B64_KEY = "k" * 43  # an Ed25519/X25519 public key in base64url
V3_ENTRIES: dict[str, object] = {
    "header (a/<asker>)": {
        "id": "x" * 16,
        "model": "smollm2-135m",
        "maxTokens": 256,
        "promptBytes": 120,
        "date": 1764460000000,
        "key": B64_KEY,
        "sig": "s" * 86,
    },
    "prompt + one grant (p/<asker>/<task>)": {
        "ct": "c" * 214,
        "grants": {B64_KEY: "g" * 172},
    },
    "assignment (in/<worker>)": {
        "task": "x" * 16,
        "asker": B64_KEY,
        "attempt": 1,
        "start": 1764460000010,
        "model": "smollm2-135m",
        "maxTokens": 256,
        "promptBytes": 120,
    },
    "status (in/<asker>)": {"worker": B64_KEY, "attempt": 1, "state": "assigned"},
    "worker status (w/<worker>)": {
        "attempt": 1,
        "state": "done",
        "end": 1764460000020,
        "usage": {"promptTokens": 30, "completionTokens": 200},
    },
    "run final (r/...)": {
        "state": "done",
        "salt": "s" * 22,
        "finishReason": "stop",
        "usage": {"promptTokens": 30, "completionTokens": 200},
        "end": 1764460000020,
    },
}


def per_call(fn: Callable[[], object], n: int) -> float:
    """Median of 5 runs of ``n`` calls, in microseconds per call."""
    runs = []
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(n):
            fn()
        runs.append((time.perf_counter() - t) / n * 1e6)
    return statistics.median(runs)


def room_with(tasks: int, streams: int) -> tuple[Doc, list[bytes]]:
    """A v2 room with ``tasks`` entries in ``doing`` and ``streams`` answer streams;
    returns it and ``PIECES`` stream pieces written by a peer, in turn to each stream."""
    doc = Doc()
    doing = doc.get("doing", type=Map)
    texts = doc.get("streams", type=Map)
    with doc.transaction():
        for i in range(tasks):
            doing[f"{i:016d}"] = dict(TASK, id=f"{i:016d}")
        for i in range(streams):
            texts[f"{i:016d}#1"] = Text()
    writer = Doc()
    writer.apply_update(doc.get_update())
    wtexts = writer.get("streams", type=Map)
    pieces = []
    for k in range(PIECES):  # each piece new to the room: never the same one twice
        before = writer.get_state()
        wtexts[f"{k % streams:016d}#1"] += " token"
        pieces.append(writer.get_update(before))
    return doc, pieces


PIECES = 5_000


def apply_cost(tasks: int, streams: int) -> float:
    """µs per new piece applied, median of 5 runs of 1,000 pieces."""
    doc, pieces = room_with(tasks, streams)
    it = iter(pieces)

    def step() -> None:
        doc.apply_update(next(it))

    return per_call(step, PIECES // 5)


def market_paths(streams: int) -> tuple[float, float]:
    """µs per stream piece for the market's work on an incoming frame: v2 as the market
    does it (frame check, apply to the room's document, one outbox put per receiver: 2
    here) and a v3 sketch (frame check, owner lookup from the name, ``get_state``, log
    append with a merge every 64 entries, one outbox put for the one subscriber)."""
    doc, pieces = room_with(streams, streams)
    v2_frames = [create_update_message(u) for u in pieces]
    outboxes: list[deque[bytes]] = [deque(), deque()]
    it2 = iter(v2_frames)

    def v2() -> None:
        frame = next(it2)
        check_frame(frame)
        doc.apply_update(Reader(frame[2:]).chunk())
        for box in outboxes:
            box.append(frame)

    owner = b"w" * 43
    names = [f"r/{'w' * 43}/{k % streams:016d}.1".encode() for k in range(PIECES)]
    v3_frames = [
        b"\x00" + uint_bytes(len(n)) + n + create_update_message(u)
        for n, u in zip(names, pieces, strict=True)
    ]
    owners = {n.decode(): owner for n in set(names)}
    logs: dict[str, list[bytes]] = {}
    box3: deque[bytes] = deque()
    it3 = iter(v3_frames)

    def v3() -> None:
        frame = next(it3)
        r = Reader(frame)
        r.byte()
        name = r.text()
        message = frame[r.pos :]
        check_frame(message)
        if owners[name] != owner:
            raise ValueError("not the owner")
        update = Reader(message[2:]).chunk()
        get_state(update)
        log = logs.setdefault(name, [])
        log.append(update)
        if len(log) >= 64:
            logs[name] = [merge_updates(*log)]
        box3.append(frame)

    for box in outboxes:
        box.clear()
    return per_call(v2, PIECES // 5), per_call(v3, PIECES // 5)


def memory_per_task(layout: str) -> float:
    """Bytes of resident memory per task for 10,000 tasks: in ``one`` Doc, or in
    ``many`` Docs of one task each. Run in a fresh process."""
    gc.collect()
    base = rss_kib()
    keep: list[Doc] = []
    if layout == "one":
        doc = Doc()
        m = doc.get("doing", type=Map)
        with doc.transaction():
            for i in range(10_000):
                m[f"{i:016d}"] = dict(TASK, id=f"{i:016d}")
        keep.append(doc)
    else:
        for i in range(10_000):
            d = Doc()
            d.get("task", type=Map)["t"] = dict(TASK, id=f"{i:016d}")
            keep.append(d)
    return (rss_kib() - base) * 1024 / 10_000


def rss_kib() -> int:
    """Current resident memory (not the peak)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


def main() -> None:
    print("1. apply one stream piece (µs) to a room with T tasks and S streams written in turn")
    for tasks, streams in ((1, 1), (1_000, 1), (10_000, 1), (100, 100), (1_000, 1_000)):
        print(f"   T={tasks:>6} S={streams:>5}: {apply_cost(tasks, streams):7.1f}")

    print("2. update log without a Doc (one task document, 100 pieces of a stream)")
    src = Doc()
    runs = src.get("chunks", type=Array)
    log: list[bytes] = []
    for _ in range(100):
        before = src.get_state()
        runs.append(os.urandom(40))
        log.append(src.get_update(before))
    merged = merge_updates(*log)
    half = Doc()
    half.apply_update(merge_updates(*log[:50]))
    sv = half.get_state()
    print(
        f"   merge 100 updates: {per_call(lambda: merge_updates(*log), 200):.1f} µs, "
        f"{len(merged)} bytes merged"
    )
    print(
        f"   diff against a state vector: {per_call(lambda: get_update(merged, sv), 2000):.1f} µs"
    )
    print(f"   state vector of the merged log: {per_call(lambda: get_state(merged), 2000):.1f} µs")

    print("3. memory (each measured in a fresh process)")
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(1) as pool:
        big = pool.apply(memory_per_task, ("one",))
    with ctx.Pool(1) as pool:
        small = pool.apply(memory_per_task, ("many",))
    print(
        f"   one Doc of 10,000 tasks: {big:.0f} B per task; 10,000 Docs of one task: "
        f"{small:.0f} B each (RSS growth)"
    )
    docs = [Doc() for _ in range(10_000)]
    for i, d in enumerate(docs):
        d.get("task", type=Map)["t"] = dict(TASK, id=f"{i:016d}")
    logs = [d.get_update() for d in docs]
    print(
        f"   the same 10,000 tasks kept as update logs: "
        f"{sum(map(len, logs)) / len(logs):.0f} B each"
    )
    del docs

    print("4. bytes of one stream piece (text ' token', 6 B; encrypted chunk 6 + 16 B)")
    d = Doc()
    s = d.get("streams", type=Map)
    s["k"] = Text()
    s["k"] += "first"
    before = d.get_state()
    s["k"] += " token"
    text_piece = d.get_update(before)
    d3 = Doc()
    chunks = d3.get("chunks", type=Array)
    chunks.append(os.urandom(22))
    before = d3.get_state()
    chunks.append(os.urandom(22))
    array_piece = d3.get_update(before)
    print(
        f"   Y.Text append: {len(text_piece)} B; Y.Array<bytes> append of 22 B: "
        f"{len(array_piece)} B"
    )

    print("5. bytes of the version 3 updates of one task (Yjs update, before framing)")
    for name, value in V3_ENTRIES.items():
        d = Doc()
        d.get("m", type=Map)["k" * 16] = value
        print(f"   {name}: {len(d.get_update())} B")

    print("6. the market's work per incoming stream piece, without the socket write (µs)")
    for streams in (1, 1_000):
        v2, v3 = market_paths(streams)
        print(
            f"   {streams:>5} answers streaming: v2 (check, apply, outbox) {v2:.1f}; "
            f"v3 sketch (check, owner, get_state, log, outbox) {v3:.1f}"
        )

    crypto_costs()


def crypto_costs() -> None:
    try:
        import nacl.bindings as b
        from nacl.public import PrivateKey, SealedBox
        from nacl.signing import SigningKey
    except ImportError:
        print("7. crypto: PyNaCl is not installed (pip install pynacl)")
        return
    print("7. crypto (µs)")
    sk = SigningKey.generate()
    vk = sk.verify_key
    msg = os.urandom(300)
    sig = sk.sign(msg).signature
    print(
        f"   Ed25519 sign 300 B: {per_call(lambda: sk.sign(msg), 2000):.1f}; "
        f"verify: {per_call(lambda: vk.verify(msg, sig), 2000):.1f}"
    )
    xk = PrivateKey.generate()
    box = SealedBox(xk.public_key)
    opener = SealedBox(xk)
    key = os.urandom(32)
    sealed = box.encrypt(key)
    print(
        f"   sealed box of a 32 B key: seal {per_call(lambda: box.encrypt(key), 2000):.1f}, "
        f"open {per_call(lambda: opener.decrypt(sealed), 2000):.1f}, "
        f"{len(sealed)} B on the wire"
    )
    prompt = os.urandom(4000)
    nonce = bytes(24)
    aead = b.crypto_aead_xchacha20poly1305_ietf_encrypt
    print(
        f"   XChaCha20-Poly1305, 4 KB prompt: "
        f"{per_call(lambda: aead(prompt, b'ad', nonce, key), 2000):.1f}; 8 B chunk: "
        f"{per_call(lambda: aead(b'x' * 8, b'ad', nonce, key), 5000):.1f}"
    )
    print(
        f"   Ed25519 -> X25519 conversion of a public key: "
        f"{per_call(lambda: vk.to_curve25519_public_key(), 2000):.1f}"
    )

    print("8. igora.v3.crypto per task and per chunk (µs)")
    from igora.identity import Identity
    from igora.v3 import crypto
    from igora.v3.header import sign_header, verify_header

    asker, worker = Identity(SigningKey.generate()), Identity(SigningKey.generate())
    asker_s, worker_s = asker.session_key(), worker.session_key()
    tid = "t" * 16
    header = sign_header(
        asker,
        {
            "id": tid,
            "model": "smollm2-135m",
            "maxTokens": 256,
            "promptBytes": 4000,
            "date": 1764460000000,
            "key": asker_s.fields()["encKey"],
        },
    )
    k = crypto.new_task_key()
    grant = crypto.seal_grant(k, header, worker_s.public_key)
    print(
        f"   grant ({len(grant)} B): seal "
        f"{per_call(lambda: crypto.seal_grant(k, header, worker_s.public_key), 1000):.1f}, "
        f"open (with the header's signature check) "
        f"{per_call(lambda: crypto.open_grant(worker_s, grant, header), 1000):.1f}"
    )
    print(f"   of which the header's check: {per_call(lambda: verify_header(header), 1000):.1f}")
    fields = {"prompt": "x" * 4000, "temperature": 0.7}
    ct = crypto.seal_prompt(k, tid, asker.id, fields)
    print(
        f"   prompt of 4 KB ({len(ct)} B): encrypt "
        f"{per_call(lambda: crypto.seal_prompt(k, tid, asker.id, fields), 2000):.1f}, "
        f"decrypt {per_call(lambda: crypto.open_prompt(k, tid, asker.id, ct), 2000):.1f}"
    )
    salt = crypto.new_salt()

    def answer_key() -> bytes:
        return crypto.worker_answer_key(k, worker_s, asker_s.public_key, 1, salt)

    print(f"   answer key K_a (X25519 + BLAKE2b): {per_call(answer_key, 2000):.1f}")
    ka = answer_key()
    for size in (8, 200):
        piece = b"x" * size
        chunk = crypto.seal_chunk(ka, tid, 1, 7, piece, False)
        seal = per_call(lambda p=piece: crypto.seal_chunk(ka, tid, 1, 7, p, False), 5000)
        opened = per_call(lambda c=chunk: crypto.open_chunk(ka, tid, 1, 7, c, False), 5000)
        print(f"   chunk of {size} B ({len(chunk)} B): encrypt {seal:.1f}, decrypt {opened:.1f}")


if __name__ == "__main__":
    if sys.argv[1:] == ["crypto"]:
        crypto_costs()
    else:
        main()
