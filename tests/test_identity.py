"""Identities: the key file in the data folder, the id, signatures, signed session keys."""

from __future__ import annotations

import base64
import json
import os
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from nacl.public import Box, PrivateKey

from igora.identity import (
    KEY_FILE,
    BadSignature,
    IdentityError,
    agent_id,
    load_identity,
    public_key,
    verify,
    verify_session_key,
)


def igora_id(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "igora", "id", *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
    )


def test_first_use_makes_a_private_key_file_and_later_uses_read_it(
    tmp_path: Path,
) -> None:
    data = tmp_path / "data"
    first, made = load_identity(data)
    assert made
    path = data / KEY_FILE
    assert first.path == path
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(data.stat().st_mode) == 0o700
    header, seed = path.read_text().split()
    assert header == "igora-ed25519" and len(base64.b64decode(seed)) == 32
    again, made = load_identity(data)
    assert not made and again.id == first.id
    assert [p.name for p in data.iterdir()] == [KEY_FILE]  # no temporary file left


def test_two_data_folders_are_two_identities(tmp_path: Path) -> None:
    a, _ = load_identity(tmp_path / "a")
    b, _ = load_identity(tmp_path / "b")
    assert a.id != b.id


def test_the_id_is_the_public_key_in_base64url_without_padding(tmp_path: Path) -> None:
    identity, _ = load_identity(tmp_path)
    assert len(identity.id) == 43 and "=" not in identity.id
    assert base64.urlsafe_b64decode(identity.id + "=") == identity.public_key
    assert bytes(public_key(identity.id)) == identity.public_key


def test_an_existing_data_folder_is_made_owner_only(tmp_path: Path) -> None:
    data = tmp_path / "store"
    data.mkdir(mode=0o755)
    os.chmod(data, 0o755)
    load_identity(data)
    assert stat.S_IMODE(data.stat().st_mode) == 0o700


@pytest.mark.parametrize(
    ("mode", "says"),
    [
        (0o644, "is readable by others (mode 0644); run chmod 600"),
        (0o640, "is readable by others (mode 0640)"),
        (0o620, "is writable by others (mode 0620)"),
        (0o666, "is readable and writable by others (mode 0666)"),
    ],
)
def test_a_key_file_others_may_use_is_refused_and_left_alone(
    tmp_path: Path, mode: int, says: str
) -> None:
    identity, _ = load_identity(tmp_path)
    path = tmp_path / KEY_FILE
    before = path.read_bytes()
    os.chmod(path, mode)
    with pytest.raises(IdentityError, match=r"\(mode") as err:
        load_identity(tmp_path)
    assert says in str(err.value) and str(path) in str(err.value)
    assert path.read_bytes() == before and stat.S_IMODE(path.stat().st_mode) == mode
    os.chmod(path, 0o600)
    assert load_identity(tmp_path)[0].id == identity.id


def test_a_folder_others_may_write_is_refused(tmp_path: Path) -> None:
    load_identity(tmp_path / "d")
    os.chmod(tmp_path / "d", 0o777)
    with pytest.raises(IdentityError, match=r"writable by others \(mode 0777\).*chmod 700"):
        load_identity(tmp_path / "d")


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"igora-ed25519\n",
        b"igora-ed25519 " + base64.b64encode(bytes(31)) + b"\n",
        b"igora-ed25519 not*base64\n",
        b"ssh-ed25519 " + base64.b64encode(bytes(32)) + b"\n",
        b"\xff\xfe garbage",
    ],
)
def test_a_corrupt_key_file_is_an_error_and_never_replaced(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / KEY_FILE
    path.write_bytes(content)
    os.chmod(path, 0o600)
    os.chmod(tmp_path, 0o700)
    with pytest.raises(IdentityError, match=r"is not an Igora key file.*move it away"):
        load_identity(tmp_path)
    assert path.read_bytes() == content


def test_a_key_path_that_is_not_a_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / KEY_FILE).mkdir()
    (tmp_path / "fifo").mkdir()
    os.mkfifo(tmp_path / "fifo" / KEY_FILE, 0o600)  # read without waiting for a writer
    for data in (tmp_path, tmp_path / "fifo"):
        os.chmod(data, 0o700)
        with pytest.raises(IdentityError, match="is not a regular file"):
            load_identity(data)


def test_concurrent_first_use_ends_with_one_key(tmp_path: Path) -> None:
    data = tmp_path / "shared"
    start = threading.Barrier(8)
    results: list[tuple[str, bool]] = []

    def first_use() -> None:
        start.wait()
        identity, made = load_identity(data)
        results.append((identity.id, made))

    threads = [threading.Thread(target=first_use) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert len(results) == 8
    assert len({id_ for id_, _ in results}) == 1
    assert sum(made for _, made in results) == 1
    assert [p.name for p in data.iterdir()] == [KEY_FILE]


def test_sign_and_verify_and_a_tampered_signature_fails(tmp_path: Path) -> None:
    me, _ = load_identity(tmp_path / "me")
    other, _ = load_identity(tmp_path / "other")
    message = b"igora3-test message"
    sig = me.sign(message)
    assert len(sig) == 64
    verify(me.id, message, sig)
    tampered = bytes([sig[0] ^ 1]) + sig[1:]
    for id_, msg, s in [
        (me.id, message, tampered),
        (me.id, message + b"!", sig),
        (other.id, message, sig),
        (me.id, message, sig[:63]),
    ]:
        with pytest.raises(BadSignature):
            verify(id_, msg, s)


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "short",
        "A" * 44,
        "A" * 42 + "!",
        "A" * 42 + "B",  # 43 characters whose last one carries bits beyond the 32 bytes
    ],
)
def test_a_malformed_agent_id_is_refused(bad: str) -> None:
    with pytest.raises(IdentityError):
        public_key(bad)


def test_a_session_key_is_signed_and_verified(tmp_path: Path) -> None:
    asker, _ = load_identity(tmp_path / "asker")
    worker, _ = load_identity(tmp_path / "worker")
    session = worker.session_key(since=1_700_000_000_000)
    fields = session.fields()
    assert set(fields) == {"encKey", "encSig", "since"}
    json.dumps(fields)  # travels in a JSON advert as it is
    enc = verify_session_key(
        worker.id, str(fields["encKey"]), 1_700_000_000_000, str(fields["encSig"])
    )
    assert bytes(enc) == bytes(session.public_key)
    # The verified key is usable: the asker's box opens with the worker's private half.
    mine = PrivateKey.generate()
    sealed = Box(mine, enc).encrypt(b"for the worker only")
    assert Box(session.private_key, mine.public_key).decrypt(sealed) == b"for the worker only"
    assert asker.session_key().since > 1_700_000_000_000  # default: now


def test_a_tampered_session_key_is_rejected(tmp_path: Path) -> None:
    worker, _ = load_identity(tmp_path / "worker")
    other, _ = load_identity(tmp_path / "other")
    session = worker.session_key(since=1000)
    key, sig = str(session.fields()["encKey"]), str(session.fields()["encSig"])
    swapped = agent_id(bytes(PrivateKey.generate().public_key))  # another X25519 key
    cases = [
        (worker.id, swapped, 1000, sig),  # the key replaced
        (worker.id, key, 1001, sig),  # the time changed
        (other.id, key, 1000, sig),  # claimed by another identity
        (worker.id, key, 1000, str(other.session_key(since=1000).fields()["encSig"])),
    ]
    for id_, k, since, s in cases:
        with pytest.raises(BadSignature):
            verify_session_key(id_, k, since, s)
    for id_, k, since, s in [
        (worker.id, key[:-1], 1000, sig),
        (worker.id, key, -1, sig),
        (worker.id, key, 1000, sig + "A"),
    ]:
        with pytest.raises(IdentityError):
            verify_session_key(id_, k, since, s)
    # A signature made for another purpose over the same bytes is not a session key's.
    raw = base64.urlsafe_b64decode(key + "=")
    wrong_label = worker.sign(raw + (1000).to_bytes(8, "big"))
    wrong_sig = base64.urlsafe_b64encode(wrong_label).rstrip(b"=").decode()
    with pytest.raises(BadSignature):
        verify_session_key(worker.id, key, 1000, wrong_sig)


# The command line: `igora id`.


def test_igora_id_is_stable_across_runs_and_follows_the_data_folder(
    tmp_path: Path,
) -> None:
    first = igora_id("--data", str(tmp_path / "a"))
    assert first.returncode == 0, first.stderr
    assert "made a new identity" in first.stderr
    second = igora_id(env={"IGORA_DATA": str(tmp_path / "a")})
    assert second.returncode == 0 and second.stderr == ""
    assert first.stdout == second.stdout and len(first.stdout.strip()) == 43
    other = igora_id("--json", env={"IGORA_DATA": str(tmp_path / "b")})
    shown = json.loads(other.stdout)
    assert shown["id"] != first.stdout.strip()
    assert shown["file"] == str(tmp_path / "b" / KEY_FILE) and shown["created"] is True
    assert bytes.fromhex(shown["ed25519"]) == base64.urlsafe_b64decode(shown["id"] + "=")


def test_igora_id_refuses_an_unsafe_or_corrupt_key_in_one_line(tmp_path: Path) -> None:
    assert igora_id("--data", str(tmp_path)).returncode == 0
    path = tmp_path / KEY_FILE
    os.chmod(path, 0o644)
    run = igora_id("--data", str(tmp_path))
    assert run.returncode == 2 and run.stdout == ""
    assert run.stderr == (
        f"igora id: error: {path} is readable by others (mode 0644); run chmod 600 {path}\n"
    )
    os.chmod(path, 0o600)
    path.write_text("igora-ed25519 ???\n")
    run = igora_id("--data", str(tmp_path))
    assert run.returncode == 2 and run.stderr.count("\n") == 1
    assert "is not an Igora key file" in run.stderr and "Traceback" not in run.stderr
    assert path.read_text() == "igora-ed25519 ???\n"


def test_two_processes_starting_at_once_share_one_key(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "igora", "id", "--data", str(tmp_path / "d")]
    procs = [
        subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=60) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert outs[0][0] == outs[1][0]
    assert sum("made a new identity" in err for _, err in outs) == 1
