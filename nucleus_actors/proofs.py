"""Merkle inclusion and consistency proofs (RFC 9162, sections 2.1.3 and 2.1.4), pure and sync.

The tree is the RFC 6962 (section 2.1) tree over the ledger's leaf hashes (`docs/hashing.md`):

```
LEAF_i    = H(0x00 || bytes_i)
NODE(l,r) = H(0x01 || l || r)
MTH({})   = H()                      # the empty tree
MTH(D[n]) = NODE(MTH(D[0:k]), MTH(D[k:n]))   k = the largest power of two < n
```

`BLAKE3` is the hash of nucleus_actors ledgers; `SHA256` is RFC 6962's own, so that outside test
vectors (and Certificate Transparency logs) check this code too. This module imports neither trio
nor the daemon: a verifier needs only it (and `blake3`).

```python
from nucleus_actors import proofs
path = proofs.inclusion_path(proofs.BLAKE3, leaves, 3, len(leaves))
proofs.verify_inclusion(proofs.BLAKE3, leaves[3], 3, len(leaves), path, root)  # or ProofError
```
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from blake3 import blake3

from .errors import ProofError
from .record import Hash

__all__ = [
    "BLAKE3",
    "SHA256",
    "ConsistencyProof",
    "Hasher",
    "InclusionProof",
    "consistency_path",
    "consistency_ranges",
    "inclusion_path",
    "inclusion_ranges",
    "root",
    "verify_consistency",
    "verify_inclusion",
]

_new_hash: Final = bytes.__new__  # both digests are 32 bytes: skip Hash's validating init


class Hasher:
    """The two hash functions of an RFC 6962 tree: `leaf(data)` and `node(left, right)`."""

    __slots__ = ("_fn", "name")

    def __init__(self, name: str, fn: Callable[[bytes], Any]) -> None:
        self.name: Final = name
        """Name of the hash function (`"blake3"`, `"sha256"`)."""
        self._fn = fn

    size: Final = 32
    """Bytes in a digest."""

    def leaf(self, data: bytes) -> Hash:
        """`H(0x00 || data)`: the leaf hash of an entry's bytes."""
        return _new_hash(Hash, self._fn(b"\x00" + data).digest())

    def node(self, left: bytes, right: bytes) -> Hash:
        """`H(0x01 || left || right)`: an interior node."""
        return _new_hash(Hash, self._fn(b"\x01" + left + right).digest())

    def empty(self) -> Hash:
        """`H()` of no bytes: the root of the empty tree."""
        return _new_hash(Hash, self._fn(b"").digest())

    def __repr__(self) -> str:
        return f"proofs.{self.name.upper()}"


BLAKE3: Final = Hasher("blake3", blake3)
"""The hash of nucleus_actors ledgers (`docs/hashing.md`)."""
SHA256: Final = Hasher("sha256", hashlib.sha256)
"""RFC 6962's SHA-256 (for outside vectors and Certificate Transparency logs)."""


# --- tree shape --------------------------------------------------------------------------------


def _split(n: int) -> int:
    """The largest power of two smaller than `n` (n >= 2)."""
    return 1 << ((n - 1).bit_length() - 1)


def _check_size(name: str, value: object, minimum: int = 0) -> int:
    if type(value) is not int or value < minimum:
        raise ProofError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def inclusion_ranges(index: int, size: int) -> list[tuple[int, int]]:
    """Leaf ranges `[start, end)` whose subtree hashes form the inclusion proof of `index`.

    In proof order (RFC 9162 `PATH(m, D[n])`: the sibling next to the leaf first).

    Raises:
        ProofError: `index` is not in `[0, size)`.
    """
    _check_size("size", size, 1)
    _check_size("index", index)
    if index >= size:
        raise ProofError(f"index must be < size ({size}), got {index}")
    ranges: list[tuple[int, int]] = []
    start, end = 0, size
    while end - start > 1:
        k = _split(end - start)
        if index - start < k:
            ranges.append((start + k, end))
            end = start + k
        else:
            ranges.append((start, start + k))
            start += k
    ranges.reverse()
    return ranges


def consistency_ranges(old_size: int, new_size: int) -> list[tuple[int, int]]:
    """Leaf ranges whose subtree hashes form the consistency proof from `old_size` to `new_size`.

    In proof order (RFC 9162 `PROOF(m, D[n])`); empty when the sizes are equal.

    Raises:
        ProofError: `old_size` is 0 (every tree extends the empty one: nothing to prove) or
            greater than `new_size`.
    """
    _check_size("old_size", old_size, 1)
    _check_size("new_size", new_size, 1)
    if old_size > new_size:
        raise ProofError(f"old_size ({old_size}) must be <= new_size ({new_size})")
    ranges: list[tuple[int, int]] = []
    m, start, end, complete = old_size, 0, new_size, True
    # SUBPROOF(m, D[start:end], complete), unrolled: the recursion is a tail call after the
    # hash it appends, so collect the hashes outermost-first and reverse.
    while True:
        n = end - start
        if m == n:
            if not complete:
                ranges.append((start, end))
            break
        k = _split(n)
        if m <= k:
            ranges.append((start + k, end))
            end = start + k
        else:
            ranges.append((start, start + k))
            m -= k
            start += k
            complete = False
    ranges.reverse()
    return ranges


# --- computing from leaf hashes ----------------------------------------------------------------


def _as_hash(name: str, value: object) -> bytes:
    if not isinstance(value, bytes | bytearray | memoryview):
        raise ProofError(f"{name} must be bytes or Hash, got {type(value).__name__}")
    data = bytes(value)
    if len(data) != 32:
        raise ProofError(f"{name} must be a 32-byte hash, got {len(data)} bytes")
    return data


def _subtree(hasher: Hasher, leaves: Sequence[bytes], start: int, end: int) -> Hash:
    # Iterative RFC 6962 root of leaves[start:end] (end > start): merge equal-height
    # subtrees on a stack as leaves arrive, then fold the stack right to left.
    node = hasher.node
    stack: list[tuple[int, bytes]] = []  # (height, hash)
    for i in range(start, end):
        height, value = 0, bytes(leaves[i])
        while stack and stack[-1][0] == height:
            value = node(stack.pop()[1], value)
            height += 1
        stack.append((height, value))
    value = stack.pop()[1]
    while stack:
        value = node(stack.pop()[1], value)
    return _new_hash(Hash, value)


def root(hasher: Hasher, leaf_hashes: Sequence[bytes]) -> Hash:
    """`MTH` of the tree over `leaf_hashes` (in seq order); `hasher.empty()` for none."""
    if not leaf_hashes:
        return hasher.empty()
    return _subtree(hasher, leaf_hashes, 0, len(leaf_hashes))


def _leaves_for(leaf_hashes: Sequence[bytes], size: int) -> None:
    if size > len(leaf_hashes):
        raise ProofError(f"size ({size}) exceeds the {len(leaf_hashes)} leaf hashes given")


def inclusion_path(
    hasher: Hasher, leaf_hashes: Sequence[bytes], index: int, size: int
) -> list[bytes]:
    """The inclusion proof of leaf `index` in the tree of the first `size` leaves.

    Raises:
        ProofError: `index` not in `[0, size)`, or fewer than `size` leaf hashes given.
    """
    ranges = inclusion_ranges(index, size)
    _leaves_for(leaf_hashes, size)
    return [_subtree(hasher, leaf_hashes, a, b) for a, b in ranges]


def consistency_path(
    hasher: Hasher, leaf_hashes: Sequence[bytes], old_size: int, new_size: int
) -> list[bytes]:
    """The consistency proof between the trees of the first `old_size` and `new_size` leaves.

    Raises:
        ProofError: `old_size` not in `[1, new_size]`, or fewer than `new_size` leaves given.
    """
    ranges = consistency_ranges(old_size, new_size)
    _leaves_for(leaf_hashes, new_size)
    return [_subtree(hasher, leaf_hashes, a, b) for a, b in ranges]


# --- verifying ---------------------------------------------------------------------------------


def _path(path: object) -> list[bytes]:
    if path is None:
        return []
    if isinstance(path, bytes | str) or not isinstance(path, Sequence):
        raise ProofError("path must be a sequence of hashes, got one bytes/str value")
    return [_as_hash(f"path[{i}]", p) for i, p in enumerate(path)]


def _mismatch(what: str, computed: bytes, given: bytes) -> ProofError:
    return ProofError(f"{what}: computed {computed.hex()}, given {bytes(given).hex()}")


def verify_inclusion(
    hasher: Hasher,
    leaf_hash: bytes,
    index: int,
    size: int,
    path: Sequence[bytes],
    root: bytes,
) -> None:
    """Check that `leaf_hash` is leaf `index` of the tree of `size` leaves whose root is `root`.

    RFC 9162 section 2.1.3.2.

    Raises:
        ProofError: the proof does not verify or is malformed (index out of range, a path of
            the wrong length, a hash that is not 32 bytes); the message says which.
    """
    _check_size("size", size)
    _check_size("index", index)
    if index >= size:
        raise ProofError(f"index must be < size ({size}), got {index}")
    hashes = _path(path)
    value = _as_hash("leaf hash", leaf_hash)
    expected = _inclusion_length(index, size)
    if len(hashes) != expected:
        raise ProofError(
            f"an inclusion proof of index {index} in size {size} has {expected} hashes, "
            f"got {len(hashes)}"
        )
    fn, sn = index, size - 1
    for p in hashes:
        if fn & 1 or fn == sn:
            value = hasher.node(p, value)
            while not fn & 1 and fn:
                fn >>= 1
                sn >>= 1
        else:
            value = hasher.node(value, p)
        fn >>= 1
        sn >>= 1
    if sn != 0:  # unreachable with the length check above; kept as RFC 9162 states it
        raise ProofError(f"inclusion path too short for index {index} in size {size}")
    if value != bytes(root):
        raise _mismatch(f"inclusion of index {index} in size {size}: root mismatch", value, root)


def _inclusion_length(index: int, size: int) -> int:
    # Hashes in PATH(index, D[size]): the inner levels where index and size-1 differ, plus one
    # per set bit of index's "border" (where the right edge of the tree is lower).
    inner = (index ^ (size - 1)).bit_length()
    return inner + (index >> inner).bit_count()


def verify_consistency(
    hasher: Hasher,
    old_size: int,
    new_size: int,
    path: Sequence[bytes] | None,
    old_root: bytes,
    new_root: bytes,
) -> None:
    """Check that the tree of `old_size` leaves (`old_root`) is a prefix of the `new_size` one.

    RFC 9162 section 2.1.4.2. Equal sizes need an empty path and equal roots. An `old_size` of
    0 is refused: every tree extends the empty tree, so such a proof proves nothing.

    Raises:
        ProofError: the proof does not verify or is malformed; the message says which.
    """
    _check_size("old_size", old_size)
    _check_size("new_size", new_size)
    hashes = _path(path)
    if old_size > new_size:
        raise ProofError(f"old_size ({old_size}) must be <= new_size ({new_size})")
    if old_size == 0:
        raise ProofError("old_size must be >= 1: every tree extends the empty tree")
    if old_size == new_size:
        if hashes:
            raise ProofError(f"sizes are equal ({old_size}): the path must be empty")
        if bytes(old_root) != bytes(new_root):
            raise _mismatch(f"equal sizes ({old_size}) with different roots", old_root, new_root)
        return
    expected = len(consistency_ranges(old_size, new_size))
    if len(hashes) != expected:
        raise ProofError(
            f"a consistency proof from {old_size} to {new_size} has {expected} hashes, "
            f"got {len(hashes)}"
        )
    # RFC 9162 2.1.4.2, steps 2-7.
    if old_size & (old_size - 1) == 0:  # a power of two: the old root is the first node
        hashes.insert(0, bytes(old_root))
    fn, sn = old_size - 1, new_size - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    fr = sr = hashes[0]
    for c in hashes[1:]:
        if sn == 0:
            raise ProofError(f"consistency path too long from {old_size} to {new_size}")
        if fn & 1 or fn == sn:
            fr = hasher.node(c, fr)
            sr = hasher.node(c, sr)
            while not fn & 1 and fn:
                fn >>= 1
                sn >>= 1
        else:
            sr = hasher.node(sr, c)
        fn >>= 1
        sn >>= 1
    if sn != 0:
        raise ProofError(f"consistency path too short from {old_size} to {new_size}")
    if fr != bytes(old_root):
        raise _mismatch(f"consistency {old_size}->{new_size}: old root mismatch", fr, old_root)
    if sr != bytes(new_root):
        raise _mismatch(f"consistency {old_size}->{new_size}: new root mismatch", sr, new_root)


# --- values ------------------------------------------------------------------------------------


def _hex_hash(obj: Mapping[str, Any], key: str) -> Hash:
    value = obj.get(key)
    try:
        return Hash.from_hex(value)  # type: ignore[arg-type]
    except ValueError:
        raise ProofError(f"{key!r} must be 64 hex digits, got {value!r}") from None


def _json_int(obj: Mapping[str, Any], key: str) -> int:
    value = obj.get(key)
    if type(value) is not int or value < 0:
        raise ProofError(f"{key!r} must be an integer >= 0, got {value!r}")
    return value


def _hex_path(obj: Mapping[str, Any]) -> tuple[Hash, ...]:
    value = obj.get("path")
    if not isinstance(value, list):
        raise ProofError(f"'path' must be a list of hex hashes, got {value!r}")
    return tuple(_hex_hash({"path": p}, "path") for p in value)


def _mapping(obj: object, what: str) -> Mapping[str, Any]:
    if not isinstance(obj, Mapping):
        raise ProofError(f"{what} JSON must be an object, got {type(obj).__name__}")
    return obj


@dataclass(frozen=True, kw_only=True, slots=True)
class InclusionProof:
    """Entry `seq` is in the ledger's tree of `size` entries, whose root is `root`."""

    seq: int
    """Seq of the entry (its leaf index)."""
    size: int
    """Tree size the proof is for (entries 0 .. size-1)."""
    leaf: Hash
    """`LEAF_seq`, the entry's leaf hash."""
    path: tuple[Hash, ...]
    """Sibling subtree hashes, the one next to the leaf first (RFC 9162 `PATH`)."""
    root: Hash
    """Root of the tree of `size` entries."""

    def verify(self, hasher: Hasher = BLAKE3) -> None:
        """Check the proof against its own `root` (compare `root` with a trusted one too).

        Raises:
            ProofError: it does not verify.
        """
        verify_inclusion(hasher, self.leaf, self.seq, self.size, self.path, self.root)

    def to_json(self) -> dict[str, Any]:
        """`{"seq", "size", "leaf", "path", "root"}`, hashes as lowercase hex."""
        return {
            "seq": self.seq,
            "size": self.size,
            "leaf": self.leaf.hex(),
            "path": [p.hex() for p in self.path],
            "root": self.root.hex(),
        }

    @classmethod
    def from_json(cls, obj: object) -> InclusionProof:
        """Parse the `to_json` form (does not verify it: call `verify`).

        Raises:
            ProofError: a field is missing or malformed.
        """
        data = _mapping(obj, "an inclusion proof")
        return cls(
            seq=_json_int(data, "seq"),
            size=_json_int(data, "size"),
            leaf=_hex_hash(data, "leaf"),
            path=_hex_path(data),
            root=_hex_hash(data, "root"),
        )


@dataclass(frozen=True, kw_only=True, slots=True)
class ConsistencyProof:
    """The ledger's tree of `old_size` entries is a prefix of its tree of `new_size` entries."""

    old_size: int
    """Size of the older tree (>= 1)."""
    new_size: int
    """Size of the newer tree (>= old_size)."""
    old_root: Hash
    """Root of the older tree."""
    new_root: Hash
    """Root of the newer tree."""
    path: tuple[Hash, ...]
    """Subtree hashes (RFC 9162 `PROOF(old_size, D[new_size])`); empty for equal sizes."""

    def verify(self, hasher: Hasher = BLAKE3) -> None:
        """Check the proof between its own two roots (compare them with trusted ones too).

        Raises:
            ProofError: it does not verify.
        """
        verify_consistency(
            hasher, self.old_size, self.new_size, self.path, self.old_root, self.new_root
        )

    def to_json(self) -> dict[str, Any]:
        """`{"from", "to", "old_root", "new_root", "path"}`, hashes as lowercase hex."""
        return {
            "from": self.old_size,
            "to": self.new_size,
            "old_root": self.old_root.hex(),
            "new_root": self.new_root.hex(),
            "path": [p.hex() for p in self.path],
        }

    @classmethod
    def from_json(cls, obj: object) -> ConsistencyProof:
        """Parse the `to_json` form (does not verify it: call `verify`).

        Raises:
            ProofError: a field is missing or malformed.
        """
        data = _mapping(obj, "a consistency proof")
        return cls(
            old_size=_json_int(data, "from"),
            new_size=_json_int(data, "to"),
            old_root=_hex_hash(data, "old_root"),
            new_root=_hex_hash(data, "new_root"),
            path=_hex_path(data),
        )
