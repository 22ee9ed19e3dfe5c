"""The daemon's checkpoint signer: signs a ledger's tree head, never backwards.

One `CheckpointSigner` per ledger with a `checkpoint_key`. It signs a C2SP checkpoint (see
`nucleus_actors.checkpoint`) every `checkpoint_interval` seconds when the ledger grew, and on
demand (`GET /v1/ledgers/{id}/checkpoint`). Before publishing a checkpoint it records it in the
state file beside the key (`<key file>.state`, JSON by origin): not in the ledger file, which a
restore rolls back. At startup it refuses a ledger that is shorter than, or inconsistent with,
the last checkpoint it signed (`IntegrityError`), unless the daemon runs with
`--accept-rollback`.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from ..checkpoint import Checkpoint, SignerKey
from ..engine import LedgerEngine
from ..errors import IntegrityError, NucleusError, ProofError, StorageError
from ..hashing import genesis
from ..record import Hash

__all__ = [
    "CheckpointSigner",
    "SignedState",
    "default_origin",
    "load_signer_key",
    "state_path",
    "write_key_file",
]

log = logging.getLogger("nucleus_actors.daemon.checkpoints")


def default_origin(ledger_id: str) -> str:
    """`<hostname>/<ledger_id>`: the checkpoint origin when `checkpoint_origin` is not set."""
    return f"{socket.gethostname()}/{ledger_id}"


def state_path(key_file: Path) -> Path:
    """Where the last signed checkpoints of a key live: `<key file>.state`."""
    return key_file.with_name(key_file.name + ".state")


def write_key_file(path: Path, key: SignerKey) -> None:
    """Write a signer key file with mode 0600 (refuses to overwrite an existing file).

    Raises:
        FileExistsError: `path` exists.
    """
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        out.write(str(key) + "\n")
        out.flush()
        os.fsync(out.fileno())


def load_signer_key(path: Path) -> SignerKey:
    """Read a signer key file (as `nucleus keygen` writes it).

    Raises:
        ProofError: the file does not hold a signer key, or others may read it (mode & 0o077).
        OSError: it cannot be read.
    """
    mode = path.stat().st_mode
    if mode & 0o077:
        raise ProofError(
            f"signer key file {path} is readable by others (mode {mode & 0o777:o}): "
            f"chmod 600 {path}"
        )
    return SignerKey.parse(path.read_text(encoding="utf-8"))


@dataclass(frozen=True, slots=True)
class SignedState:
    """The last checkpoint signed for an origin (what never to go back on)."""

    size: int
    root: Hash
    chain: Hash
    note: str

    def to_json(self) -> dict[str, Any]:
        return {
            "size": self.size,
            "root": self.root.hex(),
            "chain": self.chain.hex(),
            "note": self.note,
        }

    @classmethod
    def from_json(cls, obj: Any) -> SignedState:
        try:
            return cls(
                int(obj["size"]),
                Hash.from_hex(obj["root"]),
                Hash.from_hex(obj["chain"]),
                str(obj["note"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise NucleusError(f"malformed checkpoint state: {exc!r}") from exc


def _read_states(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise NucleusError(f"cannot read the checkpoint state file {path}: {exc}") from exc
    if not isinstance(data, dict) or not isinstance(data.get("origins"), dict):
        raise NucleusError(f"checkpoint state file {path} is not {{'origins': {{...}}}}")
    origins: dict[str, Any] = data["origins"]
    return origins


def _write_states(path: Path, origins: dict[str, Any]) -> None:
    """Replace the state file atomically and durably (temp file, fsync, rename, fsync dir)."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        json.dump({"origins": origins}, out, indent=1, sort_keys=True)
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


class CheckpointSigner:
    """Signs one ledger's checkpoints with one key, never backwards (see the module doc)."""

    def __init__(
        self,
        engine: LedgerEngine,
        key: SignerKey,
        key_file: Path,
        *,
        origin: str,
        interval: float,
        accept_rollback: bool = False,
    ) -> None:
        self.engine = engine
        self.key = key
        self.origin = origin
        self.interval = interval
        self.accept_rollback = accept_rollback
        self.state_file = state_path(key_file)
        self.last: SignedState | None = None
        """The last checkpoint signed for this origin (from the state file at `check`)."""
        self._lock = trio.Lock()

    async def check(self) -> None:
        """At startup: the ledger must extend the last signed checkpoint (engine open).

        Raises:
            IntegrityError: the ledger is shorter than, or inconsistent with, the last signed
                checkpoint, and `accept_rollback` is off.
            NucleusError: the state file is unreadable.
        """
        raw = _read_states(self.state_file).get(self.origin)
        self.last = None if raw is None else SignedState.from_json(raw)
        last = self.last
        if last is None:
            return
        problem = await self._backwards(last)
        if problem is None:
            return
        if not self.accept_rollback:
            raise IntegrityError(
                f"ledger {self.engine.config.ledger_id!r} {problem}; a checkpoint of {last.size} "
                f"entries was signed for {self.origin!r} (state {self.state_file}): the ledger "
                "was rolled back (a restored backup?). Refusing to sign backwards; run with "
                "--accept-rollback to start anyway (clients holding the later checkpoint can "
                "prove the rollback)",
                seq=min(last.size, self.engine.state.length),
            )
        log.warning(
            "ledger %r %s (last signed size %d): --accept-rollback given, signing from the "
            "current head",
            self.engine.config.ledger_id,
            problem,
            last.size,
        )
        self.last = None

    async def _backwards(self, last: SignedState) -> str | None:
        """Why signing now would go back on `last`, or None if the ledger extends it."""
        length = self.engine.state.length
        if length < last.size:
            return f"holds {length} entries, fewer than the {last.size} last signed"
        root = await self.engine.root(last.size)
        if root != last.root:
            return f"has Merkle root {root.hex()} at size {last.size}, not the signed one"
        chain = (
            genesis(self.engine.config.ledger_id)
            if last.size == 0
            else (await self.engine.get(last.size - 1)).hash
        )
        if chain != last.chain:
            return f"has chain head {chain.hex()} at size {last.size}, not the signed one"
        return None

    async def latest(self) -> str:
        """The signed note of the current head, signing one first if the ledger grew.

        Cancellation: the state file is written synchronously before the note is returned;
        a cancelled call leaves at most an unused signature.

        Raises:
            IntegrityError: the ledger no longer extends the last signed checkpoint.
            StorageError: the state file cannot be written (nothing is published).
        """
        async with self._lock:
            state = self.engine.state
            last = self.last
            if last is not None and last.size == state.length:
                return last.note
            root = await self.engine.root(state.length)
            if last is not None:
                problem = await self._backwards(last)
                if problem is not None:
                    raise IntegrityError(
                        f"refusing to sign: ledger {self.engine.config.ledger_id!r} {problem}",
                        seq=last.size,
                    )
            checkpoint = Checkpoint(
                origin=self.origin, size=state.length, root=root, chain=state.head
            )
            note = checkpoint.sign(self.key)
            signed = SignedState(state.length, root, state.head, note)
            origins = _read_states(self.state_file)
            origins[self.origin] = signed.to_json()
            try:
                _write_states(self.state_file, origins)  # durable before anyone sees the note
            except OSError as exc:
                raise StorageError(
                    f"cannot record the signed checkpoint in {self.state_file}: {exc}; "
                    "it is not published"
                ) from exc
            self.last = signed
            log.info(
                "ledger %r: signed checkpoint %s size %d",
                self.engine.config.ledger_id,
                self.origin,
                state.length,
            )
            return note

    async def run(self) -> None:
        """Sign every `interval` seconds when the ledger grew (until cancelled)."""
        while True:
            try:
                await self.latest()
            except NucleusError as exc:
                log.error(
                    "ledger %r: cannot sign a checkpoint: %s", self.engine.config.ledger_id, exc
                )
            await trio.sleep(self.interval)
