"""An agent's identity: an Ed25519 key pair kept in its data folder, and the signed X25519
session keys it encrypts with (docs/security.md §2).

The key file is ``DATA/identity.key``, one line ``igora-ed25519 <base64 of the 32-byte
seed>``, mode 0600, in a folder that others cannot write. It is made on first use and
never replaced: a file that others may read or write, or that does not hold a key, is an
error that names it and what to do, as ssh does. The agent id is the public key in
base64url without padding (43 characters), so anyone holding an id can check its
signatures.

All cryptography is PyNaCl's (libsodium): ``SigningKey`` for signatures, ``PrivateKey``
for X25519.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import os
import stat
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from nacl.exceptions import BadSignatureError
from nacl.public import PrivateKey, PublicKey
from nacl.signing import SigningKey, VerifyKey

from .config import data_dir
from .errors import IgoraError

KEY_FILE = "identity.key"
_HEADER = "igora-ed25519"
ID_LENGTH = 43  # base64url of 32 bytes, without padding
_ENC_LABEL = b"igora3-enckey"


class IdentityError(IgoraError):
    """The key file cannot be used (permissions, content) or an id is malformed."""


class BadSignature(IgoraError):
    """A signature does not verify under the key it claims."""


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def unb64url(text: str, size: int, what: str) -> bytes:
    """``size`` bytes from their canonical unpadded base64url form; IdentityError else.
    Canonical: two spellings of one key would be two ids for one identity."""
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) != size or b64url(raw) != text:
        shown = text if len(text) <= 60 else text[:60] + "..."
        raise IdentityError(f"{what} {shown!r} is not {size} bytes in base64url")
    return raw


def agent_id(public_key: bytes) -> str:
    """The agent id of an Ed25519 public key: base64url, no padding."""
    if len(public_key) != 32:
        raise IdentityError("an Ed25519 public key is 32 bytes")
    return b64url(public_key)


def public_key(id_: str) -> VerifyKey:
    """The Ed25519 key an agent id names; IdentityError if it is not one."""
    if not isinstance(id_, str) or len(id_) != ID_LENGTH:
        raise IdentityError(f"agent id {str(id_)[:60]!r} is not {ID_LENGTH} characters")
    return VerifyKey(unb64url(id_, 32, "agent id"))


def verify(id_: str, message: bytes, signature: bytes) -> None:
    """Return if ``signature`` is ``id_``'s over ``message``; raise BadSignature else."""
    key = public_key(id_)
    try:
        key.verify(message, signature)
    except (BadSignatureError, ValueError, TypeError):
        raise BadSignature(f"bad signature for agent {id_[:8]}") from None


@dataclass(frozen=True)
class Identity:
    """One agent's signing key and where it is kept."""

    signing_key: SigningKey
    path: Path | None = None

    @property
    def public_key(self) -> bytes:
        return bytes(self.signing_key.verify_key)

    @property
    def id(self) -> str:
        return agent_id(self.public_key)

    def sign(self, message: bytes) -> bytes:
        """The 64-byte Ed25519 signature of ``message``. Callers start ``message`` with a
        label of their own (``igora3-…``) so that no signature serves two purposes."""
        return self.signing_key.sign(message).signature

    def session_key(self, since: int | None = None) -> SessionKey:
        """A fresh X25519 key pair, in memory only, its public half signed by this
        identity; ``since`` (ms epoch, default now) is signed with it."""
        return SessionKey.make(self, since)


def _session_message(enc_key: bytes, since: int) -> bytes:
    return _ENC_LABEL + enc_key + since.to_bytes(8, "big")


@dataclass(frozen=True)
class SessionKey:
    """An X25519 key pair for one run of an agent, and the identity's signature over
    ``"igora3-enckey" ‖ encKey ‖ since`` (``since``: 8 bytes, big-endian ms epoch).
    Never written to disk: what was sealed to it is unreadable once the process ends."""

    private_key: PrivateKey
    since: int
    signature: bytes

    @classmethod
    def make(cls, identity: Identity, since: int | None = None) -> SessionKey:
        since = int(time.time() * 1000) if since is None else since
        _check_since(since)
        key = PrivateKey.generate()
        return cls(key, since, identity.sign(_session_message(bytes(key.public_key), since)))

    @property
    def public_key(self) -> PublicKey:
        return self.private_key.public_key

    def fields(self) -> dict[str, str | int]:
        """The advert and header fields that carry it (docs/security.md §2)."""
        return {
            "encKey": b64url(bytes(self.public_key)),
            "encSig": b64url(self.signature),
            "since": self.since,
        }


def _check_since(since: object) -> int:
    if type(since) is not int or not 0 <= since < 2**63:
        raise IdentityError(f"since {since!r} is not a time in ms (a whole number, 0 or more)")
    return since


def verify_session_key(id_: str, enc_key: str, since: int, enc_sig: str) -> PublicKey:
    """The X25519 key ``enc_key`` if ``enc_sig`` is agent ``id_``'s signature over it and
    ``since`` (the fields of ``SessionKey.fields``); BadSignature or IdentityError else."""
    key = unb64url(enc_key, 32, "encKey")
    sig = unb64url(enc_sig, 64, "encSig")
    verify(id_, _session_message(key, _check_since(since)), sig)
    return PublicKey(key)


# --- the key file -------------------------------------------------------------------


def key_path(data: Path | None = None) -> Path:
    return (data if data is not None else data_dir()) / KEY_FILE


def load_identity(data: Path | None = None) -> tuple[Identity, bool]:
    """The identity of data folder ``data`` (default: ``IGORA_DATA`` or the XDG data
    folder), made on first use; the flag says whether this call made it."""
    path = key_path(data)
    identity = _read(path)
    if identity is not None:
        return identity, False
    made = _create(path)
    identity = _read(path)
    if identity is None:  # removed between our link and our read
        raise IdentityError(f"{path} disappeared while it was being made; run again")
    return identity, made


def _read(path: Path) -> Identity | None:
    """The identity in ``path``, None if there is no file; IdentityError if it is unsafe
    or not a key. Permissions are checked on the open file, not on the name."""
    nonblock = getattr(os, "O_NONBLOCK", 0)  # a FIFO in its place must not hang us
    try:
        fd = os.open(path, os.O_RDONLY | nonblock)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise IdentityError(f"cannot read {path}: {exc.strerror}") from None
    try:
        _check_safe(path, os.fstat(fd))
        content = os.read(fd, 200)
    except OSError as exc:
        raise IdentityError(f"cannot read {path}: {exc.strerror}") from None
    finally:
        os.close(fd)
    return Identity(_parse(path, content), path)


def _check_safe(path: Path, st: os.stat_result) -> None:
    if not stat.S_ISREG(st.st_mode):
        raise IdentityError(f"{path} is not a regular file")
    mode = stat.S_IMODE(st.st_mode)
    if os.name == "posix":
        if st.st_uid != os.getuid():
            raise IdentityError(
                f"{path} belongs to another user (uid {st.st_uid}); "
                "an identity's key must be its owner's"
            )
        if mode & 0o077:
            how = "readable" if mode & 0o044 else "writable"
            if mode & 0o044 and mode & 0o022:
                how = "readable and writable"
            raise IdentityError(
                f"{path} is {how} by others (mode {mode:04o}); run chmod 600 {path}"
            )
        folder = path.parent.stat()
        if stat.S_IMODE(folder.st_mode) & 0o022:
            raise IdentityError(
                f"{path.parent} is writable by others (mode {stat.S_IMODE(folder.st_mode):04o}),"
                f" who could replace {KEY_FILE}; run chmod 700 {path.parent}"
            )


def _parse(path: Path, content: bytes) -> SigningKey:
    fix = "move it away to make a new identity, or restore it from a backup"
    try:
        header, seed_b64 = content.decode("ascii").strip("\n").split(" ")
        seed = base64.b64decode(seed_b64, validate=True)
    except (UnicodeDecodeError, ValueError, binascii.Error):
        header, seed = "", b""
    if header != _HEADER or len(seed) != 32:
        raise IdentityError(
            f"{path} is not an Igora key file ({_HEADER} and a 32-byte seed); {fix}"
        )
    return SigningKey(seed)


def _create(path: Path) -> bool:
    """Write a new key to ``path`` unless one appears first; True if ours won. The key is
    written whole to a private temporary file, synced, then hard-linked to its name,
    which fails if the name exists: a crash leaves no half key, and of processes that
    start at once the first link wins and the others read its key."""
    folder = path.parent
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        if os.name == "posix" and folder.stat().st_uid == os.getuid():
            os.chmod(folder, 0o700)  # the store beside the key holds prompts too
        fd, tmp = tempfile.mkstemp(prefix=".identity-", suffix=".tmp", dir=folder)
    except OSError as exc:
        raise IdentityError(f"cannot make the key file in {folder}: {exc.strerror}") from None
    try:
        seed = bytes(SigningKey.generate())
        with os.fdopen(fd, "wb") as f:  # mkstemp made it 0600
            f.write(f"{_HEADER} {base64.b64encode(seed).decode('ascii')}\n".encode("ascii"))
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        except OSError as exc:
            raise IdentityError(f"cannot make {path}: {exc.strerror}") from None
        _sync_folder(folder)
        return True
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)


def _sync_folder(folder: Path) -> None:
    with contextlib.suppress(OSError):  # not every system can open a folder
        dfd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def show(data: Path | None, as_json: bool) -> int:
    """``igora id``: print the id (or, with ``as_json``, the keys and the file)."""
    identity, made = load_identity(data)
    if made:
        print(f"igora id: made a new identity in {identity.path}", file=sys.stderr)
    if as_json:
        print(
            json.dumps(
                {
                    "id": identity.id,
                    "ed25519": identity.public_key.hex(),
                    "file": str(identity.path),
                    "created": made,
                }
            )
        )
    else:
        print(identity.id)
    return 0
