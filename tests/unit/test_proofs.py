"""Merkle proofs: the RFC 6962 vectors (SHA-256), exhaustive and sampled BLAKE3 trees, tampering."""

from __future__ import annotations

import base64
import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
from blake3 import blake3

from nucleus_actors import Hash, ProofError
from nucleus_actors.hashing import chain_step, chain_step_leaf, leaf_hash, merkle_root, node_hash
from nucleus_actors.proofs import (
    BLAKE3,
    SHA256,
    ConsistencyProof,
    InclusionProof,
    consistency_path,
    consistency_ranges,
    inclusion_path,
    inclusion_ranges,
    root,
    verify_consistency,
    verify_inclusion,
)

# The outside vectors live beside the project (`../shared/vectors/`); NUCLEUS_VECTORS overrides
# that folder (for checkouts elsewhere, e.g. git worktrees).
VECTORS = (
    Path(
        os.environ.get("NUCLEUS_VECTORS") or Path(__file__).parents[2].parent / "shared" / "vectors"
    )
    / "rfc6962"
)
_MISSING = f"the RFC 6962 vectors folder {VECTORS} is absent (see shared/vectors/README.md)"


def _vector_files(kind: str) -> list[Path]:
    if not VECTORS.is_dir():
        return []
    return sorted((VECTORS / kind).rglob("*.json"))


def _b64(value: str | None) -> bytes:
    return base64.b64decode(value or "")


def _ids(path: Path) -> str:
    return str(path.relative_to(VECTORS))


def test_vector_folder_is_complete() -> None:
    if not VECTORS.is_dir():
        pytest.skip(_MISSING)
    assert len(_vector_files("inclusion")) + len(_vector_files("consistency")) == 196


@pytest.mark.parametrize("path", _vector_files("inclusion"), ids=_ids)
def test_rfc6962_inclusion_vector(path: Path) -> None:
    case = json.loads(path.read_text())
    args = (
        SHA256,
        _b64(case["leafHash"]),
        case["leafIdx"],
        case["treeSize"],
        [_b64(p) for p in case["proof"] or []],
        _b64(case["root"]),
    )
    if case["wantErr"]:
        with pytest.raises(ProofError, match=r"\w"):
            verify_inclusion(*args)
    else:
        verify_inclusion(*args)


@pytest.mark.parametrize("path", _vector_files("consistency"), ids=_ids)
def test_rfc6962_consistency_vector(path: Path) -> None:
    case = json.loads(path.read_text())
    args = (
        SHA256,
        case["size1"],
        case["size2"],
        [_b64(p) for p in case["proof"] or []],
        _b64(case["root1"]),
        _b64(case["root2"]),
    )
    if case["wantErr"]:
        with pytest.raises(ProofError, match=r"\w"):
            verify_consistency(*args)
    else:
        verify_consistency(*args)


def test_rfc6962_reference_tree_with_sha256() -> None:
    """The 8-leaf tree of RFC 6962's reference tests: our paths equal the vectors' happy paths."""
    if not VECTORS.is_dir():
        pytest.skip(_MISSING)
    happy = [
        json.loads(p.read_text())
        for p in _vector_files("inclusion")
        if p.name == "happy-path.json" and "additional" not in p.parts
    ]
    leaves = [
        SHA256.leaf(bytes.fromhex(h))
        for h in ["", "00", "10", "2021", "3031", "40414243", "5051525354555657",
                  "606162636465666768696a6b6c6d6e6f"]
    ]  # fmt: skip
    checked = 0
    for case in happy:
        size, index = case["treeSize"], case["leafIdx"]
        if size > len(leaves) or SHA256.leaf(b"") != leaves[0]:
            continue
        if _b64(case["leafHash"]) != leaves[index]:
            continue
        assert root(SHA256, leaves[:size]) == _b64(case["root"])
        assert inclusion_path(SHA256, leaves, index, size) == [_b64(p) for p in case["proof"] or []]
        checked += 1
    for path in _vector_files("consistency"):
        case = json.loads(path.read_text())
        if path.name != "happy-path.json" or case["size1"] == case["size2"]:
            continue
        m, n = case["size1"], case["size2"]
        if n <= len(leaves) and root(SHA256, leaves[:n]) == _b64(case["root2"]):
            assert consistency_path(SHA256, leaves, m, n) == [_b64(p) for p in case["proof"]]
            checked += 1
    assert checked >= 4, "the vectors no longer describe the RFC 6962 reference tree"


# --- BLAKE3, exhaustive and sampled ------------------------------------------------------------

LEAVES = [leaf_hash(b"entry %d" % i) for i in range(2000)]


def _reference_root(leaves: list[bytes]) -> bytes:
    # Straight from the RFC 6962 definition, independent of proofs.root.
    if not leaves:
        return blake3(b"").digest()
    if len(leaves) == 1:
        return leaves[0]
    k = 1 << ((len(leaves) - 1).bit_length() - 1)
    return blake3(b"\x01" + _reference_root(leaves[:k]) + _reference_root(leaves[k:])).digest()


def _ceil_log2(n: int) -> int:
    return (n - 1).bit_length()


def test_roots_match_the_definition_and_hashing() -> None:
    for n in [*range(70), 255, 256, 257, 1000, 2000]:
        expected = _reference_root(LEAVES[:n])
        assert root(BLAKE3, LEAVES[:n]) == expected
        assert merkle_root(LEAVES[:n]) == expected
    assert root(BLAKE3, []) == BLAKE3.empty() == blake3(b"").digest()
    assert BLAKE3.node(LEAVES[0], LEAVES[1]) == node_hash(LEAVES[0], LEAVES[1])
    assert BLAKE3.leaf(b"entry 0") == LEAVES[0]
    assert isinstance(root(BLAKE3, LEAVES[:3]), Hash)
    prev = Hash(bytes(32))
    assert chain_step_leaf(prev, 7, b"entry 7") == (LEAVES[7], chain_step(prev, 7, b"entry 7"))


def _check_inclusion(n: int, index: int, roots: dict[int, bytes]) -> None:
    path = inclusion_path(BLAKE3, LEAVES, index, n)
    assert len(path) <= _ceil_log2(n)
    verify_inclusion(BLAKE3, LEAVES[index], index, n, path, roots[n])


def _check_consistency(m: int, n: int, roots: dict[int, bytes]) -> None:
    path = consistency_path(BLAKE3, LEAVES, m, n)
    assert len(path) <= _ceil_log2(n) + 1
    verify_consistency(BLAKE3, m, n, path, roots[m], roots[n])


def test_every_proof_of_every_tree_up_to_64() -> None:
    roots = {n: _reference_root(LEAVES[:n]) for n in range(65)}
    for n in range(1, 65):
        for index in range(n):
            _check_inclusion(n, index, roots)
        for m in range(1, n + 1):
            _check_consistency(m, n, roots)


def test_random_proofs_up_to_2000() -> None:
    rng = random.Random(1962)
    sizes = sorted({*rng.sample(range(65, 2001), 30), 255, 256, 257, 511, 1024, 2000})
    for n in sizes:
        indexes = {0, n - 1, *rng.sample(range(n), 10)}
        olds = {1, n - 1, n, *rng.sample(range(1, n + 1), 10)}
        roots = {k: root(BLAKE3, LEAVES[:k]) for k in {n, *olds}}
        for index in indexes:
            _check_inclusion(n, index, roots)
        for m in olds:
            _check_consistency(m, n, roots)


def _flips(value: bytes) -> list[bytes]:
    return [value[:i] + bytes([value[i] ^ 0x01]) + value[i + 1 :] for i in range(len(value))]


@pytest.mark.parametrize(("index", "n"), [(0, 1), (0, 2), (5, 7), (6, 7), (13, 64), (100, 257)])
def test_any_one_byte_change_breaks_an_inclusion_proof(index: int, n: int) -> None:
    r = root(BLAKE3, LEAVES[:n])
    path = inclusion_path(BLAKE3, LEAVES, index, n)
    leaf = LEAVES[index]
    for bad in _flips(leaf):
        with pytest.raises(ProofError, match="root mismatch"):
            verify_inclusion(BLAKE3, bad, index, n, path, r)
    for bad in _flips(r):
        with pytest.raises(ProofError, match="root mismatch"):
            verify_inclusion(BLAKE3, leaf, index, n, path, bad)
    for i, p in enumerate(path):
        for bad in _flips(p):
            changed = [*path[:i], bad, *path[i + 1 :]]
            with pytest.raises(ProofError, match="root mismatch"):
                verify_inclusion(BLAKE3, leaf, index, n, changed, r)
    # Wrong index, a smaller size, a hash too many or too few. (A larger size can verify with
    # the same root when the path has the same shape: the signed checkpoint binds the size.)
    for i2, n2 in [(index + 1, n), (index ^ 1, n), (index, max(1, n // 2))]:
        if (i2, n2) != (index, n):
            with pytest.raises(ProofError, match=r"mismatch|hashes|index"):
                verify_inclusion(BLAKE3, leaf, i2, n2, path, r)
    with pytest.raises(ProofError, match="hashes, got"):
        verify_inclusion(BLAKE3, leaf, index, n, [*path, LEAVES[0]], r)
    if path:
        with pytest.raises(ProofError, match="hashes, got"):
            verify_inclusion(BLAKE3, leaf, index, n, path[:-1], r)


@pytest.mark.parametrize(("m", "n"), [(1, 2), (3, 7), (4, 8), (6, 8), (7, 64), (100, 257)])
def test_any_one_byte_change_breaks_a_consistency_proof(m: int, n: int) -> None:
    old, new = root(BLAKE3, LEAVES[:m]), root(BLAKE3, LEAVES[:n])
    path = consistency_path(BLAKE3, LEAVES, m, n)
    for bad in _flips(old):
        with pytest.raises(ProofError, match="mismatch"):
            verify_consistency(BLAKE3, m, n, path, bad, new)
    for bad in _flips(new):
        with pytest.raises(ProofError, match="mismatch"):
            verify_consistency(BLAKE3, m, n, path, old, bad)
    for i, p in enumerate(path):
        for bad in _flips(p):
            changed = [*path[:i], bad, *path[i + 1 :]]
            with pytest.raises(ProofError, match="mismatch"):
                verify_consistency(BLAKE3, m, n, changed, old, new)
    with pytest.raises(ProofError, match="hashes, got"):
        verify_consistency(BLAKE3, m, n, [*path, LEAVES[0]], old, new)
    with pytest.raises(ProofError, match="hashes, got"):
        verify_consistency(BLAKE3, m, n, path[1:], old, new)
    with pytest.raises(ProofError, match=r"(new|old) root mismatch"):
        verify_consistency(BLAKE3, m, n, path, new, old)


def test_malformed_arguments_are_proof_errors() -> None:
    r = root(BLAKE3, LEAVES[:4])
    with pytest.raises(ProofError, match="index must be < size"):
        inclusion_ranges(4, 4)
    with pytest.raises(ProofError, match="size must be an int >= 1"):
        inclusion_path(BLAKE3, LEAVES, 0, 0)
    with pytest.raises(ProofError, match="exceeds the 3 leaf hashes"):
        inclusion_path(BLAKE3, LEAVES[:3], 0, 4)
    with pytest.raises(ProofError, match="old_size must be an int >= 1"):
        consistency_ranges(0, 4)
    with pytest.raises(ProofError, match=r"old_size \(5\) must be <= new_size \(4\)"):
        consistency_ranges(5, 4)
    with pytest.raises(ProofError, match="32-byte hash, got 31"):
        verify_inclusion(BLAKE3, LEAVES[0][:31], 0, 4, [LEAVES[1], LEAVES[2]], r)
    with pytest.raises(ProofError, match=r"path\[1\] must be a 32-byte hash"):
        verify_inclusion(BLAKE3, LEAVES[0], 0, 4, [LEAVES[1], b"x"], r)
    with pytest.raises(ProofError, match="must be bytes or Hash, got str"):
        verify_inclusion(BLAKE3, LEAVES[0], 0, 4, ["ab" * 32, LEAVES[2]], r)  # type: ignore[list-item]
    with pytest.raises(ProofError, match="index must be an int >= 0"):
        verify_inclusion(BLAKE3, LEAVES[0], -1, 4, [], r)
    with pytest.raises(ProofError, match="extends the empty tree"):
        verify_consistency(BLAKE3, 0, 4, [], BLAKE3.empty(), r)
    with pytest.raises(ProofError, match="path must be empty"):
        verify_consistency(BLAKE3, 4, 4, [r], r, r)
    assert consistency_path(BLAKE3, LEAVES, 4, 4) == []
    verify_consistency(BLAKE3, 4, 4, [], r, Hash(r))


def test_ranges_follow_rfc9162_examples() -> None:
    # RFC 9162 section 2.1.5: the 7-leaf tree of its figure.
    assert inclusion_ranges(0, 7) == [(1, 2), (2, 4), (4, 7)]  # PATH(0) = [b, h, l]
    assert inclusion_ranges(3, 7) == [(2, 3), (0, 2), (4, 7)]  # PATH(3) = [c, g, l]
    assert inclusion_ranges(4, 7) == [(5, 6), (6, 7), (0, 4)]  # PATH(4) = [f, j, k]
    assert inclusion_ranges(6, 7) == [(4, 6), (0, 4)]  # PATH(6) = [i, k]
    assert consistency_ranges(3, 7) == [(2, 3), (3, 4), (0, 2), (4, 7)]  # [c, d, g, l]
    assert consistency_ranges(4, 7) == [(4, 7)]  # [l]
    assert consistency_ranges(6, 7) == [(4, 6), (6, 7), (0, 4)]  # [i, j, k]


# --- values ------------------------------------------------------------------------------------


def test_inclusion_proof_value_round_trips_and_verifies() -> None:
    n, seq = 10, 6
    proof = InclusionProof(
        seq=seq,
        size=n,
        leaf=LEAVES[seq],
        path=tuple(Hash(p) for p in inclusion_path(BLAKE3, LEAVES, seq, n)),
        root=root(BLAKE3, LEAVES[:n]),
    )
    proof.verify()
    wire = json.loads(json.dumps(proof.to_json()))
    assert set(wire) == {"seq", "size", "leaf", "path", "root"}
    assert wire["leaf"] == LEAVES[seq].hex()
    assert InclusionProof.from_json(wire) == proof
    with pytest.raises(AttributeError):
        proof.seq = 1  # type: ignore[misc]
    with pytest.raises(ProofError, match="root mismatch"):
        InclusionProof.from_json({**wire, "seq": 5}).verify()
    with pytest.raises(ProofError, match="'leaf' must be 64 hex digits"):
        InclusionProof.from_json({**wire, "leaf": "zz"})
    with pytest.raises(ProofError, match="'size' must be an integer >= 0"):
        InclusionProof.from_json({**wire, "size": "10"})
    with pytest.raises(ProofError, match="'path' must be a list"):
        InclusionProof.from_json({**wire, "path": None})
    with pytest.raises(ProofError, match="must be an object"):
        InclusionProof.from_json([])


def test_consistency_proof_value_round_trips_and_verifies() -> None:
    m, n = 5, 13
    proof = ConsistencyProof(
        old_size=m,
        new_size=n,
        old_root=root(BLAKE3, LEAVES[:m]),
        new_root=root(BLAKE3, LEAVES[:n]),
        path=tuple(Hash(p) for p in consistency_path(BLAKE3, LEAVES, m, n)),
    )
    proof.verify()
    wire = json.loads(json.dumps(proof.to_json()))
    assert set(wire) == {"from", "to", "old_root", "new_root", "path"}
    assert ConsistencyProof.from_json(wire) == proof
    with pytest.raises(ProofError, match="mismatch"):
        ConsistencyProof.from_json({**wire, "old_root": wire["new_root"]}).verify()
    with pytest.raises(ProofError, match="'from' must be an integer"):
        ConsistencyProof.from_json({**wire, "from": -1})


def test_importing_proofs_imports_no_runtime() -> None:
    code = (
        "import sys, nucleus_actors.proofs\n"
        "heavy = {'trio', 'fastapi', 'hypercorn', 'pydantic'} & set(sys.modules)\n"
        "print(sorted(heavy))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]", out.stderr


def test_hashing_doc_proof_example_runs() -> None:
    doc = (Path(__file__).parents[2] / "docs" / "hashing.md").read_text(encoding="utf-8")
    section = doc.split("## Merkle proofs", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 1
    namespace: dict[str, object] = {}
    exec(compile(blocks[0], "hashing.md", "exec"), namespace)
    assert namespace["root"] == root(BLAKE3, [BLAKE3.leaf(b"entry %d" % i) for i in range(7)])
