"""Signed checkpoints: C2SP `signed-note` with Ed25519, carrying a C2SP `tlog-checkpoint` body.

A checkpoint commits to a ledger at one size: its Merkle tree root and its blake3 chain head.

```
<origin>                      e.g. host.example/orders
<size>                        decimal, no leading zeros
<root>                        base64 of the Merkle root (docs/hashing.md, blake3 RFC 6962 tree)
chain <hex>                   extension line: CHAIN_{size-1} (the genesis hash when size is 0)

— <key name> base64(key ID || Ed25519 signature of the text above)
```

Keys are written as the Go `golang.org/x/mod/sumdb/note` strings (also C2SP signed-note's):
verifier `name+hex8(key ID)+base64(0x01 || public key)`, signer
`PRIVATE+KEY+name+hex8(key ID)+base64(0x01 || seed)`, with
`key ID = SHA-256(name || 0x0A || 0x01 || public key)[:4]`. This module needs `cryptography`
(and imports no trio): a verifier uses it alone.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Final

from .errors import ProofError
from .record import Hash

__all__ = [
    "Checkpoint",
    "SignedNote",
    "SignerKey",
    "VerifierKey",
    "open_note",
    "sign_note",
]

_ED25519: Final = 0x01
_DASH: Final = "\u2014 "  # em dash, space
_MAX_SIGNATURES: Final = 100
_MAX_NOTE_BYTES: Final = 1 << 20
_CHAIN: Final = "chain "
_SIZE: Final = re.compile(r"0|[1-9][0-9]{0,19}")
_CONTROL: Final = re.compile(r"[\x00-\x09\x0b-\x1f]")


def _b64decode(text: str, what: str) -> bytes:
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, ValueError, UnicodeEncodeError):
        raise ProofError(f"{what} is not standard base64: {text!r}") from None


def _check_name(name: object) -> str:
    if not isinstance(name, str) or not name or "+" in name or any(c.isspace() for c in name):
        raise ProofError(
            f"a key name must be non-empty, without spaces or '+' (signed-note), got {name!r}"
        )
    if _CONTROL.search(name) or "\n" in name:
        raise ProofError(f"a key name must not contain control characters, got {name!r}")
    return name


def _key_id(name: str, public: bytes) -> int:
    digest = hashlib.sha256(name.encode("utf-8") + b"\n" + bytes([_ED25519]) + public).digest()
    return int.from_bytes(digest[:4], "big")


@dataclass(frozen=True, slots=True)
class VerifierKey:
    """An Ed25519 note verifier key: its name, key ID and 32-byte public key."""

    name: str
    """Key name (a checkpoint's signer names itself after the origin line)."""
    public: bytes
    """The 32-byte Ed25519 public key (RFC 8032 encoding)."""

    @property
    def key_id(self) -> int:
        """`SHA-256(name || 0x0A || 0x01 || public)[:4]` as a big-endian uint32."""
        return _key_id(self.name, self.public)

    @classmethod
    def parse(cls, text: str) -> VerifierKey:
        """Parse `name+hex8+base64(0x01 || public key)`.

        Raises:
            ProofError: malformed, not Ed25519, or the key ID does not match name and key.
        """
        if not isinstance(text, str):
            raise ProofError(f"a verifier key is a str, got {type(text).__name__}")
        parts = text.strip().split("+", 2)  # base64 may hold '+'
        if len(parts) != 3:
            raise ProofError(f"a verifier key is name+keyid+base64, got {text!r}")
        name, hex_id, material = parts
        _check_name(name)
        if not re.fullmatch(r"[0-9a-f]{8}", hex_id):
            raise ProofError(f"a verifier key ID is 8 lowercase hex digits, got {hex_id!r}")
        raw = _b64decode(material, "verifier key material")
        if len(raw) != 33 or raw[0] != _ED25519:
            raise ProofError(
                "verifier key material must be 0x01 (Ed25519) and a 32-byte public key, got "
                f"{len(raw)} bytes starting {raw[:1].hex() or 'with nothing'}"
            )
        key = cls(name, raw[1:])
        if key.key_id != int(hex_id, 16):
            raise ProofError(
                f"verifier key ID {hex_id} does not match its name and key "
                f"(expected {key.key_id:08x})"
            )
        return key

    def __str__(self) -> str:
        material = base64.b64encode(bytes([_ED25519]) + self.public).decode("ascii")
        return f"{self.name}+{self.key_id:08x}+{material}"

    def verify(self, message: bytes, signature: bytes) -> bool:
        """Whether `signature` (64 bytes, no key ID) is this key's Ed25519 signature."""
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

        try:
            Ed25519PublicKey.from_public_bytes(self.public).verify(signature, message)
        except (InvalidSignature, ValueError):
            return False
        return True


@dataclass(frozen=True, slots=True, repr=False)
class SignerKey:
    """An Ed25519 note signer key: its name and 32-byte private seed (keep it secret)."""

    name: str
    """Key name (use the checkpoint origin)."""
    seed: bytes
    """The 32-byte Ed25519 private key seed (RFC 8032)."""

    @classmethod
    def generate(cls, name: str) -> SignerKey:
        """A new random key named `name`.

        Raises:
            ProofError: `name` is not a valid key name.
        """
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        seed = Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )
        return cls(_check_name(name), seed)

    @classmethod
    def parse(cls, text: str) -> SignerKey:
        """Parse `PRIVATE+KEY+name+hex8+base64(0x01 || seed)`.

        Raises:
            ProofError: malformed, not Ed25519, or the key ID does not match.
        """
        if not isinstance(text, str):
            raise ProofError(f"a signer key is a str, got {type(text).__name__}")
        parts = text.strip().split("+", 4)  # base64 may hold '+'
        if len(parts) != 5 or parts[:2] != ["PRIVATE", "KEY"]:
            raise ProofError("a signer key is PRIVATE+KEY+name+keyid+base64")
        name, hex_id, material = parts[2:]
        _check_name(name)
        raw = _b64decode(material, "signer key material")
        if len(raw) != 33 or raw[0] != _ED25519:
            raise ProofError("signer key material must be 0x01 (Ed25519) and a 32-byte seed")
        key = cls(name, raw[1:])
        if f"{key.verifier().key_id:08x}" != hex_id:
            raise ProofError(f"signer key ID {hex_id!r} does not match its name and key")
        return key

    def __str__(self) -> str:
        material = base64.b64encode(bytes([_ED25519]) + self.seed).decode("ascii")
        return f"PRIVATE+KEY+{self.name}+{self.verifier().key_id:08x}+{material}"

    def __repr__(self) -> str:
        return f"SignerKey(name={self.name!r}, seed=<secret>)"

    def verifier(self) -> VerifierKey:
        """The matching verifier key (the one to publish)."""
        from cryptography.hazmat.primitives import serialization

        public = (
            self._private()
            .public_key()
            .public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        )
        return VerifierKey(self.name, public)

    def _private(self) -> Any:
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        return Ed25519PrivateKey.from_private_bytes(self.seed)

    def sign(self, message: bytes) -> bytes:
        """The 64-byte Ed25519 signature of `message`."""
        signature: bytes = self._private().sign(message)
        return signature


@dataclass(frozen=True, slots=True)
class SignedNote:
    """A verified note: its text and the names of the known keys whose signatures verified."""

    text: str
    """The note text, ending in a newline."""
    verified: tuple[str, ...]
    """Names of the given verifier keys that signed it (at least one)."""


def _check_text(text: str) -> None:
    if not text.endswith("\n"):
        raise ProofError("a note text must end with a newline")
    if _CONTROL.search(text):
        raise ProofError("a note must not contain control characters other than newline")


def sign_note(text: str, signers: Iterable[SignerKey]) -> str:
    """The signed note: `text` (ending in a newline), a blank line, one line per signer.

    Raises:
        ProofError: `text` is not a valid note text, or no signer is given.
    """
    _check_text(text)
    lines = []
    message = text.encode("utf-8")
    for signer in signers:
        key_id = signer.verifier().key_id.to_bytes(4, "big")
        sig = base64.b64encode(key_id + signer.sign(message)).decode("ascii")
        lines.append(f"{_DASH}{signer.name} {sig}\n")
    if not lines:
        raise ProofError("a signed note needs at least one signer")
    return text + "\n" + "".join(lines)


def open_note(note: str | bytes, verifiers: Sequence[VerifierKey]) -> SignedNote:
    """Check a signed note against the trusted `verifiers` (C2SP signed-note rules).

    Signatures from unknown keys (name and key ID not both matching a verifier) are ignored;
    a signature from a known key that fails to verify rejects the whole note; at least one
    known key's signature must verify.

    Raises:
        ProofError: malformed note, a bad signature from a known key, or none verified.
    """
    if isinstance(note, bytes):
        if len(note) > _MAX_NOTE_BYTES:
            raise ProofError(f"a note is at most {_MAX_NOTE_BYTES} bytes, got {len(note)}")
        try:
            note = note.decode("utf-8")
        except UnicodeDecodeError:
            raise ProofError("a signed note must be valid UTF-8") from None
    if _CONTROL.search(note):
        raise ProofError("a note must not contain control characters other than newline")
    split = note.rfind("\n\n")
    if split < 0 or not note.endswith("\n"):
        raise ProofError("a signed note is text, a blank line, then signature lines")
    text, block = note[: split + 1], note[split + 2 :]
    lines = block[:-1].split("\n")
    if len(lines) > _MAX_SIGNATURES:
        raise ProofError(f"a note may carry at most {_MAX_SIGNATURES} signatures")
    known = {(v.name, v.key_id): v for v in verifiers}
    message = text.encode("utf-8")
    verified: list[str] = []
    for line in lines:
        if not line.startswith(_DASH):
            raise ProofError(f"a signature line starts with an em dash and a space: {line!r}")
        name, sep, sig64 = line[len(_DASH) :].partition(" ")
        if not sep:
            raise ProofError(f"a signature line is '— name base64': {line!r}")
        _check_name(name)
        raw = _b64decode(sig64, f"the signature of {name!r}")
        if len(raw) < 5:
            raise ProofError(f"the signature of {name!r} is too short ({len(raw)} bytes)")
        verifier = known.get((name, int.from_bytes(raw[:4], "big")))
        if verifier is None:
            continue  # an unknown key: ignore it (key rotation, witnesses)
        if not verifier.verify(message, raw[4:]):
            raise ProofError(f"the signature of known key {name!r} does not verify")
        verified.append(name)
    if not verified:
        names = ", ".join(sorted({v.name for v in verifiers})) or "none given"
        raise ProofError(f"no signature from a known key ({names}) on the note")
    return SignedNote(text, tuple(verified))


@dataclass(frozen=True, kw_only=True, slots=True)
class Checkpoint:
    """The head of a ledger at one size: Merkle root and chain head (a C2SP tlog-checkpoint)."""

    origin: str
    """The log's identity (default `<hostname>/<ledger_id>`); the signer's key name."""
    size: int
    """Number of entries."""
    root: Hash
    """Root of the Merkle tree of `size` entries."""
    chain: Hash | None
    """`CHAIN_{size-1}` (genesis for size 0); `None` for a checkpoint without the extension."""

    def body(self) -> str:
        """The note text: origin, size, base64 root, the `chain <hex>` line; ends in newline."""
        lines = [self.origin, str(self.size), base64.b64encode(self.root).decode("ascii")]
        if self.chain is not None:
            lines.append(_CHAIN + self.chain.hex())
        return "\n".join(lines) + "\n"

    @classmethod
    def parse(cls, text: str) -> Checkpoint:
        """Parse a checkpoint note text (unsigned: see `verify`).

        Raises:
            ProofError: not a tlog-checkpoint text, or a malformed chain line.
        """
        _check_text(text)
        lines = text[:-1].split("\n")
        if len(lines) < 3 or any(not line for line in lines):
            raise ProofError("a checkpoint is at least three non-empty lines")
        origin, size_text, root64, *extensions = lines
        if not _SIZE.fullmatch(size_text) or int(size_text) >= 2**64:
            raise ProofError(f"checkpoint tree size must be a decimal uint64, got {size_text!r}")
        root = _b64decode(root64, "checkpoint root hash")
        if len(root) != 32:
            raise ProofError(f"checkpoint root hash must be 32 bytes, got {len(root)}")
        chain: Hash | None = None
        for line in extensions:
            if line.startswith(_CHAIN):
                try:
                    chain = Hash.from_hex(line[len(_CHAIN) :])
                except ValueError:
                    raise ProofError(
                        f"checkpoint chain line must be 64 hex digits: {line!r}"
                    ) from None
        return cls(origin=origin, size=int(size_text), root=Hash(root), chain=chain)

    def sign(self, signer: SignerKey) -> str:
        """The signed note of this checkpoint."""
        return sign_note(self.body(), [signer])

    @classmethod
    def verify(
        cls, note: str | bytes, verifier: VerifierKey, *, origin: str | None = None
    ) -> Checkpoint:
        """Check a signed checkpoint with `verifier` and parse it.

        Args:
            note: the signed note.
            verifier: the log's key (its signature must be on the note and verify).
            origin: the expected origin line; default: the verifier key's name.

        Raises:
            ProofError: the note does not verify, or is not a checkpoint of `origin`.
        """
        opened = open_note(note, [verifier])
        checkpoint = cls.parse(opened.text)
        expected = verifier.name if origin is None else origin
        if checkpoint.origin != expected:
            raise ProofError(f"checkpoint origin is {checkpoint.origin!r}, expected {expected!r}")
        return checkpoint

    def to_json(self) -> dict[str, Any]:
        """`{"origin", "size", "root", "chain"}`, hashes as lowercase hex (chain may be null)."""
        return {
            "origin": self.origin,
            "size": self.size,
            "root": self.root.hex(),
            "chain": None if self.chain is None else self.chain.hex(),
        }
