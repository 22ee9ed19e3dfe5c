"""docs/verification.md: its blake3 + cryptography code accepts our checkpoints and proofs and
rejects tampered ones."""

from __future__ import annotations

import ast
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from nucleus_actors import Hash, Record
from nucleus_actors.checkpoint import Checkpoint, SignerKey
from nucleus_actors.hashing import canonical_bytes, chain_step, genesis
from nucleus_actors.proofs import BLAKE3, InclusionProof, inclusion_path, root

DOC = Path(__file__).parents[2] / "docs" / "verification.md"


def _doc_code() -> str:
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(encoding="utf-8"), re.S)
    assert len(blocks) == 1, "docs/verification.md should hold one Python block"
    return str(blocks[0])


def test_doc_code_uses_only_blake3_and_cryptography() -> None:
    code = _doc_code()
    modules = set()
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.Import):
            modules |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            modules.add((node.module or "").split(".")[0])
    assert modules <= {"base64", "hashlib", "blake3", "cryptography"}, modules
    lines = [line for line in code.splitlines() if line.strip()]
    assert len(lines) <= 35, f"the page promises about 30 lines, it has {len(lines)}"


@pytest.fixture(scope="module")
def doc() -> dict[str, Callable[..., Any]]:
    namespace: dict[str, Any] = {}
    exec(compile(_doc_code(), str(DOC), "exec"), namespace)
    return namespace


def _ledger(n: int) -> tuple[list[bytes], list[bytes], Hash]:
    datas, leaves, head = [], [], genesis("orders")
    for seq in range(n):
        record = Record("order.created", {"id": seq}, seq=seq, timestamp=1_700_000_000_000_000)
        data = canonical_bytes(record)
        datas.append(data)
        leaves.append(BLAKE3.leaf(data))
        head = chain_step(head, seq, data)
    return datas, leaves, head


@pytest.mark.parametrize("n", [1, 2, 7, 300])
def test_doc_code_checks_a_checkpoint_and_every_sampled_proof(
    doc: dict[str, Callable[..., Any]], n: int
) -> None:
    datas, leaves, head = _ledger(n)
    signer = SignerKey.generate("host.example/orders")
    vkey = str(signer.verifier())
    checkpoint = Checkpoint(origin=signer.name, size=n, root=root(BLAKE3, leaves), chain=head)
    note = checkpoint.sign(signer)
    size, tree_root = doc["check_checkpoint"](note, vkey)
    assert (size, tree_root) == (n, checkpoint.root)
    for seq in sorted({0, n // 2, n - 1}):
        proof = InclusionProof(
            seq=seq,
            size=n,
            leaf=Hash(leaves[seq]),
            path=tuple(Hash(p) for p in inclusion_path(BLAKE3, leaves, seq, n)),
            root=checkpoint.root,
        ).to_json()
        doc["check_inclusion"](proof, datas[seq], size, tree_root)
        with pytest.raises(AssertionError):
            doc["check_inclusion"](proof, datas[seq] + b" ", size, tree_root)
        if proof["path"]:
            bad = {**proof, "path": [proof["path"][0][::-1], *proof["path"][1:]]}
            with pytest.raises(AssertionError, match="not in the checkpointed tree"):
                doc["check_inclusion"](bad, datas[seq], size, tree_root)


def test_doc_code_refuses_bad_checkpoints(doc: dict[str, Callable[..., Any]]) -> None:
    from cryptography.exceptions import InvalidSignature

    signer = SignerKey.generate("host.example/orders")
    vkey = str(signer.verifier())
    note = Checkpoint(origin=signer.name, size=3, root=Hash(bytes(32)), chain=None).sign(signer)
    with pytest.raises(InvalidSignature):
        doc["check_checkpoint"](note.replace("\n3\n", "\n4\n"), vkey)
    other = SignerKey.generate("host.example/orders")
    with pytest.raises(ValueError, match=r"not signed by host\.example/orders"):
        doc["check_checkpoint"](note, str(other.verifier()))
