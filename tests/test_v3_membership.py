"""Membership of a secure market (docs/security.md §5): members, bans, invitations,
against a real ``igora market --secure`` process, with raw peers (tests/v3_peers.py) and
the agents' ``Session``; the invitation codec; and the gateway's API keys that speak for
identities (§7), against a real gateway and echo worker."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from pycrdt import Map
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from igora.gateway.guard import GuardMiddleware
from igora.gateway.keys import KeyStore, speaker
from igora.identity import Identity, load_identity
from igora.market.members import InviteError, make_invite, read_invite
from igora.testing import wait_for, wait_until
from igora.v3 import wire
from igora.v3.handshake import Response, Welcome
from igora.v3.header import verify_header
from igora.v3.session import Event, EventKind, Refused, Session

from .conftest import Cluster
from .v3_peers import RawPeer, new_identity

ROOM = "market"
NOT_MEMBER = "not a member of this market: ask its operator for an invitation"


def igora(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "igora", *args], capture_output=True, text=True, timeout=60
    )


def action(cluster: Cluster, *args: str) -> str:
    """``igora market ARGS --data`` the market's folder; its stdout (it must succeed)."""
    done = igora("market", *args, "--data", str(cluster.data))
    assert done.returncode == 0, done.stderr
    return done.stdout


def add_member(cluster: Cluster, id: str) -> None:
    """``igora market members add --data DATA -- ID`` (an id may begin with '-')."""
    done = igora("market", "members", "add", "--data", str(cluster.data), "--", id)
    assert done.returncode == 0, done.stderr


Refusal = tuple[str, int, str]
"""The AUTH DENIED's reason, the close code and the close reason."""


async def answer(url: str, *ids: Identity, invite: str | None = None) -> RawPeer | Refusal:
    """Handshake as ``ids``: the welcomed peer, or the refusal."""
    peer = await RawPeer.open(url, ROOM)
    challenge = await peer.read_challenge()
    peer.response = Response.make(challenge, list(ids), invite)
    await peer.send(peer.response.frame())
    frame = wire.decode(await peer.recv_bytes())
    assert isinstance(frame, wire.Auth), frame
    if frame.type is wire.AuthType.WELCOME:
        peer.welcome = Welcome.read(frame, challenge, peer.response.check(challenge))
        return peer
    assert frame.type is wire.AuthType.DENIED and isinstance(frame.body, str), frame
    code, reason = await peer.closed()
    assert code is not None
    return frame.body, code, reason


async def refused(url: str, *ids: Identity, invite: str | None = None) -> Refusal:
    got = await answer(url, *ids, invite=invite)
    assert isinstance(got, tuple), "welcomed, not refused"
    return got


async def joins(url: str, *ids: Identity, invite: str | None = None) -> RawPeer:
    """A welcomed peer, once the market admits ``ids`` (the market reads its tables
    every second: retried for up to 10 s)."""

    async def attempt() -> RawPeer | None:
        got = await answer(url, *ids, invite=invite)
        return got if isinstance(got, RawPeer) else None

    return await wait_for(attempt, 10, "the market to admit the identity", every=0.1)


async def refused_soon(url: str, *ids: Identity) -> Refusal:
    """The refusal of ``ids``, once the market read the change that refuses them."""

    async def attempt() -> Refusal | None:
        got = await answer(url, *ids)
        if isinstance(got, RawPeer):
            await got.close()
            return None
        return got

    return await wait_for(attempt, 10, "the market to refuse the identity", every=0.1)


# ------------------------------------------------------------------ the invitation codec
def test_an_invitation_reads_back_on_its_market_only() -> None:
    market, other = new_identity(), new_identity()
    invite, code = make_invite(market, 3, 3600)
    assert code.startswith("igora-invite:") and "=" not in code
    assert read_invite(code, market.id) == invite
    assert invite.uses == 3 and invite.market == market.id
    assert abs(invite.exp - (time.time() + 3600) * 1000) < 60_000
    with pytest.raises(InviteError, match="invitation not this market's"):
        read_invite(code, other.id)
    # Signed by another key while naming this market: a forgery.
    _, forged = make_invite(other, 3, 3600)
    raw = base64.urlsafe_b64decode(forged[13:] + "==")
    payload = raw[:-64].replace(other.id.encode(), market.id.encode())
    fake = "igora-invite:" + base64.urlsafe_b64encode(payload + raw[-64:]).decode().rstrip("=")
    with pytest.raises(InviteError, match="invitation not this market's"):
        read_invite(fake, market.id)
    # More uses written into a real one: its signature no longer matches.
    raw = base64.urlsafe_b64decode(code[13:] + "==")
    more = raw[:-64].replace(b'"uses":3', b'"uses":9') + raw[-64:]
    with pytest.raises(InviteError, match="not this market's"):
        read_invite("igora-invite:" + base64.urlsafe_b64encode(more).decode(), market.id)
    _, old = make_invite(market, 1, 60, now=time.time() - 120)
    with pytest.raises(InviteError, match="invitation expired"):
        read_invite(old, market.id)
    for bad in ("hello", "igora-invite:", "igora-invite:!!!", code[:-10], code + "x" * 2000):
        with pytest.raises(InviteError, match="not an invitation"):
            read_invite(bad, market.id)


# ------------------------------------------------------------------ members and bans
async def test_members_only_and_a_ban_closes_within_a_second(cluster: Cluster) -> None:
    cluster.market("--secure")  # --members list is the default
    assert cluster.status()["market"]["members"] == "list"
    url = cluster.url
    alice, bob = new_identity(), new_identity()
    denied, code, reason = await refused(url, alice)
    assert (code, reason) == (4403, NOT_MEMBER[:123]) and NOT_MEMBER.startswith(denied[:40])
    assert "invitation" in denied  # the list market says to ask its operator
    assert "4403" in cluster.procs[0].log()

    action(cluster, "members", "add", alice.id, "--note", "alice")
    action(cluster, "members", "add", bob.id)
    assert action(cluster, "members", "list").splitlines() == [f"{alice.id}  alice", bob.id]
    peer = await joins(url, alice)
    assert peer.welcome is not None and peer.welcome.granted == [alice.id]
    other = await joins(url, bob)

    # A ban on the running market closes alice's connection, not bob's, and says why.
    action(cluster, "ban", alice.id, "--reason", "spam in prompts")
    code, reason = await peer.closed(timeout=10)  # read every second: well within 10 s
    assert (code, reason) == (4403, "banned: spam in prompts")
    banned = "banned: spam in prompts"
    assert await refused(url, alice) == (banned, 4403, banned)
    await other.barrier()  # bob is still served

    # Unbanned, alice joins again; a member removed is closed like a banned one.
    action(cluster, "unban", alice.id)
    again = await joins(url, alice)
    action(cluster, "members", "remove", bob.id)
    assert await other.closed(timeout=10) == (4403, "no longer a member of this market")
    await again.barrier()

    # The agent's Session ends with Refused and the market's reason, and no retry.
    with pytest.raises(Refused) as err:
        async with Session(f"{url}/{ROOM}", bob, data=cluster.dir, connect_timeout=10):
            pass
    assert err.value.code == 4403 and NOT_MEMBER in str(err.value)


async def test_an_invitation_admits_once(cluster: Cluster) -> None:
    cluster.market("--secure", "--members", "invite")
    url = cluster.url
    code = action(cluster, "invite", "--uses", "1", "--ttl", "1d").strip()
    assert code.startswith("igora-invite:")
    alice, bob, carol = new_identity(), new_identity(), new_identity()
    denied, status, _ = await refused(url, alice)
    assert (denied, status) == (NOT_MEMBER, 4403)

    # Through the agents' Session: the invitation is passed in the RESPONSE, once.
    async with Session(
        f"{url}/{ROOM}", alice, data=cluster.dir, connect_timeout=10, invite=code
    ) as session:
        assert session.granted == [alice.id] and session.invite is None
    assert alice.id in action(cluster, "members", "list")  # a member now
    await (await RawPeer.join(url, ROOM, alice)).barrier()  # without the invitation

    denied, status, reason = await refused(url, bob, invite=code)
    assert (denied, status, reason) == ("invitation used up", 4403, "invitation used up")
    # Expired, and signed by another market: refused, nothing used.
    market, _ = load_identity(cluster.data)
    _, old = make_invite(market, 5, 60, now=time.time() - 3600)
    assert (await refused(url, bob, invite=old))[0] == "invitation expired"
    _, foreign = make_invite(new_identity(), 5, 3600)
    assert (await refused(url, bob, invite=foreign))[0] == "invitation not this market's"
    assert bob.id not in action(cluster, "members", "list")

    # Two uses: two ids on one connection take both; a third is refused.
    two = action(cluster, "invite", "--uses", "2").strip()
    peer = await joins(url, bob, carol, invite=two)
    assert peer.welcome is not None and sorted(peer.welcome.granted) == sorted([bob.id, carol.id])
    denied, _, _ = await refused(url, new_identity(), invite=two)
    assert denied == "invitation used up"


async def test_a_list_market_takes_no_invitations(cluster: Cluster) -> None:
    cluster.market("--secure", "--members", "list")
    code = action(cluster, "invite").strip()
    denied, status, _ = await refused(cluster.url, new_identity(), invite=code)
    assert status == 4403 and "takes no invitations" in denied


async def test_an_open_market_admits_anyone_but_the_banned(cluster: Cluster) -> None:
    cluster.market("--secure", "--members", "open")
    assert cluster.status()["market"]["members"] == "open"
    alice = new_identity()
    await (await RawPeer.join(cluster.url, ROOM, new_identity())).barrier()
    action(cluster, "ban", alice.id)
    assert await refused_soon(cluster.url, alice) == ("banned", 4403, "banned")


def test_membership_commands_fail_in_one_line(tmp_path: Path) -> None:
    data = str(tmp_path / "m")
    someone = new_identity().id
    cases = [
        (["market", "members", "list", "--data", data], "no market store"),
        (["market", "members", "add", "nope", "--data", data], "agent id 'nope'"),
        (["market", "members", "remove", someone, "--data", data], "is not a member"),
        (["market", "unban", someone, "--data", data], "is not banned"),
        (["market", "invite", "--ttl", "soon", "--data", data], "is not a duration"),
        (["market", "invite", "--uses", "0", "--data", data], "out of range"),
        (["market", "--members", "list", "--port", "1"], "needs --secure"),
        (["market", "--secure", "--memory", "--port", "1"], "not --memory"),
        (["market", "ban", someone, "--reason", "two\nlines", "--data", data], "one line"),
    ]
    for args, message in cases:
        done = igora(*args)
        assert done.returncode == 2, (args, done)
        assert message in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
        assert "Traceback" not in done.stderr
    help_text = igora("market", "--help").stdout
    assert "'invite'" in help_text and "--members" in help_text
    assert "invite" in igora("market", "invite", "--help").stdout


# ------------------------------------------------------------------ gateway API keys
def test_gateway_keys_speak_for_identities_and_only_their_hash_is_kept(
    echo_market: Cluster, tmp_path: Path
) -> None:
    data = tmp_path / "gw"
    done = igora("gateway", "keys", "add", "alice", "--data", str(data))
    assert done.returncode == 0, done.stderr
    key = done.stdout.strip()
    assert key.startswith("ig-") and len(key) == 3 + 43 and "only time" in done.stderr
    identity_file = data / "gateway" / "identities" / "alice" / "identity.key"
    assert identity_file.stat().st_mode & 0o777 == 0o600
    alice_id = load_identity(identity_file.parent)[0].id
    assert igora("gateway", "keys", "list", "--data", str(data)).stdout.split() == [
        "alice",
        alice_id,
    ]
    again = igora("gateway", "keys", "add", "alice", "--data", str(data))
    assert again.returncode == 2 and "exists" in again.stderr
    # The store holds the key's SHA-256, never the key, in the file nor its WAL.
    stored = b"".join(p.read_bytes() for p in (data / "gateway").glob("keys.sqlite3*"))
    assert hashlib.sha256(key.encode()).digest() in stored
    assert key.encode() not in stored and key[3:].encode() not in stored

    _, base = echo_market.gateway("--data", str(data))
    unknown = openai.OpenAI(base_url=f"{base}/v1", api_key="ig-" + "A" * 43, max_retries=0)
    with pytest.raises(openai.AuthenticationError) as err:
        unknown.chat.completions.create(model="echo", messages=[{"role": "user", "content": "x"}])
    assert err.value.status_code == 401 and err.value.code == "invalid_api_key"
    bare = httpx.post(f"{base}/v1/chat/completions", json={"messages": []}, timeout=30)
    assert bare.status_code == 401 and bare.json()["error"]["code"] == "invalid_api_key"
    client = openai.OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0)
    answer = client.chat.completions.create(
        model="echo", messages=[{"role": "user", "content": "hello"}]
    )
    assert answer.choices[0].message.content == "Echo: hello"
    # Removed while the gateway runs: refused at the next request.
    assert igora("gateway", "keys", "remove", "alice", "--data", str(data)).returncode == 0
    with pytest.raises(openai.AuthenticationError):
        client.chat.completions.create(model="echo", messages=[{"role": "user", "content": "x"}])
    assert igora("gateway", "keys", "remove", "alice", "--data", str(data)).returncode == 2


def test_a_request_knows_the_identity_its_key_speaks_for(tmp_path: Path) -> None:
    store = KeyStore(tmp_path)
    key, entry = store.add("bob")

    async def whoami(request: Request) -> JSONResponse:
        who = speaker(request)
        return JSONResponse({"id": who.id if who else None, "name": who and who.name})

    app = Starlette(routes=[Route("/v1/whoami", whoami)])
    guarded = GuardMiddleware(app, ["plain-key"], key_store=store)
    with TestClient(guarded) as http:
        got = http.get("/v1/whoami", headers={"Authorization": f"Bearer {key}"})
        assert got.json() == {"id": entry.id, "name": "bob"}
        assert entry.identity().id == entry.id  # the key the v3 client will sign with
        plain = http.get("/v1/whoami", headers={"Authorization": "Bearer plain-key"})
        assert plain.json() == {"id": None, "name": None}
        assert http.get("/v1/whoami", headers={"Authorization": "Bearer nope"}).status_code == 401
    store.close()


def test_gateway_keys_prove_and_sign_as_their_identities(cluster: Cluster, tmp_path: Path) -> None:
    """In a secure market whose members are the key identities (not the gateway's own),
    a task of key A is put as A (its header in ``a/<A>``, signed by A, its answer sealed
    to a session key of A's), B's as B; A's identity reads nothing of B's task; a key
    added while the gateway runs is proved then; a key whose identity is no member gets
    a 403 at once; a removed key a 401."""
    gw_data = tmp_path / "gw"
    keys: dict[str, str] = {}
    for who in ("alice", "bob", "carol"):
        done = igora("gateway", "keys", "add", who, "--data", str(gw_data))
        assert done.returncode == 0, done.stderr
        keys[who] = done.stdout.strip()
    ids = {who: KeyStore(gw_data).find_name(who).id for who in keys}  # type: ignore[union-attr]
    folder = gw_data / "gateway" / "identities"
    broker = load_identity(Path(cluster.agent_data("b1")["IGORA_DATA"]))[0]
    worker = load_identity(Path(cluster.agent_data("w1")["IGORA_DATA"]))[0]
    cluster.market("--secure", "--broker-key", broker.id)  # --members list
    for member in (broker.id, worker.id, ids["alice"], ids["bob"]):  # carol: not a member
        add_member(cluster, member)
    cluster.broker(name="b1", data=True)
    cluster.worker("--delay", "0.02", name="w1", data=True)
    cluster.wait_agents("worker", 1)
    proc, base = cluster.gateway("--data", str(gw_data), data=True)

    def sdk(who: str) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{base}/v1", api_key=keys[who], max_retries=0, timeout=60)

    def ask(who: str, text: str) -> str:
        raw = sdk(who).chat.completions.with_raw_response.create(
            model="echo", messages=[{"role": "user", "content": text}]
        )
        assert raw.parse().choices[0].message.content == f"Echo: {text}"
        return raw.headers["x-igora-task"]

    async def main() -> None:
        # What the broker's identity reads: every asker's headers and every inbox.
        seen: dict[str, tuple[str, dict[str, Any]]] = {}  # task id -> (document, header)
        status: dict[str, dict[str, Any]] = {}  # task id -> its assignment

        async with Session(f"{cluster.url}/{ROOM}", broker, data=cluster.dir) as view:

            def record(event: Event) -> None:
                doc = view.docs.get(event.name)
                if event.kind is not EventKind.CHANGED or doc is None:
                    return
                for tid, value in doc.get("tasks", type=Map).items():
                    if event.name.startswith("a/"):
                        seen.setdefault(tid, (event.name, dict(value)))
                    elif event.name.startswith("in/") and "worker" in dict(value):
                        status[tid] = dict(value)  # an assignment

            view.observe(record)
            view.subscribe("a/", prefix=True)
            view.subscribe("in/", prefix=True)
            words = " ".join(f"w{i}" for i in range(20))  # long enough to be seen running
            tid_a, tid_b = await asyncio.gather(
                asyncio.to_thread(ask, "alice", f"from alice {words}"),
                asyncio.to_thread(ask, "bob", f"from bob {words}"),
            )
            await wait_for(lambda: tid_a in seen and tid_b in seen, 10, "both headers seen")
            headers = {}
            for who, tid in (("alice", tid_a), ("bob", tid_b)):
                doc, header = seen[tid]
                assert doc == f"a/{ids[who]}" and header["asker"] == ids[who]
                verify_header(header)  # signed by the key's identity
                headers[who] = header
            assert headers["alice"]["key"] != headers["bob"]["key"]  # sealed to each its own
            gateway_own = load_identity(Path(cluster.agent_data("gateway")["IGORA_DATA"]))[0]
            assert all(doc != f"a/{gateway_own.id}" for doc, _ in seen.values())

            # Alice's identity reads nothing of bob's task: prompt, inbox, run.
            assert status[tid_b]["worker"] == worker.id
            run = f"r/{worker.id}/{tid_b}.{int(status[tid_b]['attempt'])}"
            alice = load_identity(folder / "alice")[0]
            async with Session(f"{cluster.url}/{ROOM}", alice, data=cluster.dir) as spy:
                events = spy.events()
                names = [f"p/{ids['bob']}/{tid_b}", f"in/{ids['bob']}", run]
                for name in names:
                    spy.subscribe(name)
                refused = set()
                while refused != set(names):
                    event = await asyncio.wait_for(anext(events), 10)
                    assert event.kind is not EventKind.CHANGED or event.name not in names
                    if event.kind is EventKind.REFUSED:
                        refused.add(event.name)

            # Not a member: a 403 that says so, at once.
            with pytest.raises(openai.PermissionDeniedError) as err:
                await asyncio.to_thread(ask, "carol", "let me in")
            assert err.value.code == "identity_not_admitted" and ids["carol"] in str(err.value)

            # A key added (and made a member) while the gateway runs: proved then.
            done = igora("gateway", "keys", "add", "dave", "--data", str(gw_data))
            keys["dave"] = done.stdout.strip()
            dave = load_identity(folder / "dave")[0]
            add_member(cluster, dave.id)
            await asyncio.sleep(1.5)  # the market reads its members every second
            tid_d = await asyncio.to_thread(ask, "dave", f"from dave {words}")
            await wait_for(lambda: tid_d in seen, 10, "dave's header seen")
            assert seen[tid_d][0] == f"a/{dave.id}"
            await asyncio.to_thread(ask, "alice", "still served after the new handshake")

            # Bob banned: the market closes the gateway's connection (it proved bob), the
            # gateway proves the others again; bob gets the 403, alice is served.
            banned = igora("market", "ban", "--data", str(cluster.data), "--", ids["bob"])
            assert banned.returncode == 0, banned.stderr

            def bob_refused() -> bool:
                try:
                    ask("bob", "am I banned")
                except openai.PermissionDeniedError as exc:
                    return exc.code == "identity_not_admitted"
                except openai.APIStatusError as exc:  # 503 while it connects again
                    assert exc.status_code == 503, exc
                return False

            await wait_for(lambda: asyncio.to_thread(bob_refused), 20, "bob refused")
            await asyncio.to_thread(ask, "alice", "served after bob's ban")

        # Removed: 401 at the next request.
        assert igora("gateway", "keys", "remove", "alice", "--data", str(gw_data)).returncode == 0
        with pytest.raises(openai.AuthenticationError):
            await asyncio.to_thread(ask, "alice", "x")
        assert "Traceback" not in proc.log()

    asyncio.run(main())


def test_a_worker_banned_while_it_serves_stops_with_the_reason(cluster: Cluster) -> None:
    """A role whose session the market refuses for good (a ban, here) ends, and its
    command exits non-zero with the reason, instead of staying up with nothing to serve."""
    worker = load_identity(Path(cluster.agent_data("w1")["IGORA_DATA"]))[0]
    cluster.market("--secure")  # --members list
    add_member(cluster, worker.id)
    proc = cluster.worker(name="w1", data=True)
    cluster.wait_agents("worker", 1)
    action(cluster, "ban", worker.id, "--reason", "sold fake answers")
    wait_until(lambda: proc.poll() is not None or None, 20, proc.log)
    assert proc.returncode not in (0, None)
    last = proc.log().strip().splitlines()[-1]
    assert last.startswith("igora worker: error:") and "banned: sold fake answers" in last
