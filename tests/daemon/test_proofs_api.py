"""Proofs and checkpoints over HTTP (in process), and the signer's never-sign-backwards rule."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import trio
import trio.testing

from nucleus_actors import (
    ConsistencyProof,
    InclusionProof,
    IntegrityError,
    LedgerConfig,
    LedgerEngine,
    Record,
    StorageError,
    open_ledger,
)
from nucleus_actors.checkpoint import Checkpoint, SignerKey
from nucleus_actors.daemon import DaemonState
from nucleus_actors.daemon.checkpoints import (
    CheckpointSigner,
    load_signer_key,
    state_path,
    write_key_file,
)
from nucleus_actors.errors import ProofError
from nucleus_actors.proofs import BLAKE3, root

from .conftest import app_client, serving_main

ORIGIN = "test.example/main"


def _host(engine: LedgerEngine, signer: CheckpointSigner | None = None) -> DaemonState:
    state = serving_main(engine)
    state.hosts["main"].signer = signer
    return state


def _signer(engine: LedgerEngine, tmp_path: Path, **options: bool) -> CheckpointSigner:
    path = tmp_path / "main.key"
    if not path.exists():
        write_key_file(path, SignerKey.generate(ORIGIN))
    return CheckpointSigner(
        engine, load_signer_key(path), path, origin=ORIGIN, interval=60.0, **options
    )


async def test_proof_endpoints_answer_json_that_verifies() -> None:
    async with open_ledger(LedgerConfig(ledger_id="main")) as engine:
        await engine.append_many([Record("k", {"n": n}) for n in range(10)])
        leaves = [BLAKE3.leaf(e.canonical) async for e in engine.read(0)]
        async with app_client(_host(engine)) as api:
            response = await api.get("/v1/ledgers/main/proof/inclusion", params={"seq": 3})
            assert response.status_code == 200
            body = response.json()
            assert set(body) == {"seq", "size", "leaf", "path", "root"}
            assert (body["seq"], body["size"]) == (3, 10)
            assert body["root"] == root(BLAKE3, leaves).hex()
            InclusionProof.from_json(body).verify()
            response = await api.get(
                "/v1/ledgers/main/proof/inclusion", params={"seq": 3, "size": 4}
            )
            assert response.json()["root"] == root(BLAKE3, leaves[:4]).hex()
            response = await api.get(
                "/v1/ledgers/main/proof/consistency", params={"from": 4, "to": 9}
            )
            body = response.json()
            assert set(body) == {"from", "to", "old_root", "new_root", "path"}
            proof = ConsistencyProof.from_json(body)
            assert (proof.old_size, proof.new_size) == (4, 9)
            proof.verify()
            response = await api.get("/v1/ledgers/main/proof/consistency", params={"from": 4})
            assert response.json()["to"] == 10


@pytest.mark.parametrize(
    ("path", "params", "status", "detail"),
    [
        ("inclusion", {"seq": 10}, 404, "seq must be an int in"),
        ("inclusion", {"seq": 0, "size": 11}, 404, "beyond the ledger length 10"),
        ("inclusion", {"seq": -1}, 422, "greater than or equal to 0"),
        ("inclusion", {"seq": "x"}, 422, "valid integer"),
        ("inclusion", {}, 422, "Field required"),
        ("consistency", {"from": 0}, 422, "greater than or equal to 1"),
        ("consistency", {"from": 5, "to": 4}, 404, "beyond the ledger length 4"),
        ("consistency", {"from": 3, "to": 11}, 404, "beyond the ledger length 10"),
    ],
)
async def test_bad_proof_parameters_are_4xx_problems(
    path: str, params: dict[str, object], status: int, detail: str
) -> None:
    async with open_ledger(LedgerConfig(ledger_id="main")) as engine:
        await engine.append_many([Record("k", {"n": n}) for n in range(10)])
        async with app_client(_host(engine)) as api:
            response = await api.get(f"/v1/ledgers/main/proof/{path}", params=params)
            assert response.status_code == status
            assert response.headers["content-type"] == "application/problem+json"
            assert detail in response.json()["detail"]
            missing = await api.get("/v1/ledgers/nope/proof/inclusion", params={"seq": 0})
            assert missing.status_code == 404


async def test_no_checkpoint_key_is_a_404_problem() -> None:
    async with (
        open_ledger(LedgerConfig(ledger_id="main")) as engine,
        app_client(_host(engine)) as api,
    ):
        response = await api.get("/v1/ledgers/main/checkpoint")
        assert response.status_code == 404
        assert response.json()["type"].endswith("/no-checkpoint")


async def test_checkpoint_endpoint_signs_when_the_ledger_grew(tmp_path: Path) -> None:
    async with open_ledger(LedgerConfig(ledger_id="main")) as engine:
        signer = _signer(engine, tmp_path)
        await signer.check()
        verifier = signer.key.verifier()
        async with app_client(_host(engine, signer)) as api:
            empty = await api.get("/v1/ledgers/main/checkpoint")
            assert empty.status_code == 200
            assert empty.headers["content-type"].startswith("text/plain")
            first = Checkpoint.verify(empty.text, verifier)
            assert (first.size, first.root, first.chain) == (0, BLAKE3.empty(), engine.state.head)
            await engine.append_many([Record("k", {"n": n}) for n in range(5)])
            note = (await api.get("/v1/ledgers/main/checkpoint")).text
            signed = Checkpoint.verify(note, verifier)
            assert (signed.size, signed.chain) == (5, engine.state.head)
            assert signed.root == await engine.root()
            again = (await api.get("/v1/ledgers/main/checkpoint")).text
            assert again == note  # nothing grew: the same checkpoint, not a new signature
    state = state_path(tmp_path / "main.key")
    assert stat.S_IMODE(state.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "main.key").stat().st_mode) == 0o600
    assert ORIGIN in state.read_text()


async def test_the_signer_runs_every_interval_when_the_ledger_grew(
    tmp_path: Path, mock_clock: trio.testing.MockClock
) -> None:
    async with open_ledger(LedgerConfig(ledger_id="main")) as engine:
        signer = _signer(engine, tmp_path)
        await signer.check()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(signer.run)
            await trio.sleep(1)
            assert signer.last is not None
            assert signer.last.size == 0
            await engine.append(Record("k", {}))
            await trio.sleep(58)
            assert signer.last.size == 0
            await trio.sleep(2)
            assert signer.last.size == 1
            nursery.cancel_scope.cancel()


async def test_never_signs_backwards(tmp_path: Path) -> None:
    config = LedgerConfig(ledger_id="main")
    async with open_ledger(config) as engine:
        await engine.append_many([Record("k", {"n": n}) for n in range(8)])
        signer = _signer(engine, tmp_path)
        await signer.check()
        await signer.latest()
    # A shorter ledger (a restored backup): refused, unless the rollback is accepted.
    async with open_ledger(config) as engine:
        await engine.append_many([Record("k", {"n": n}) for n in range(5)])
        with pytest.raises(IntegrityError, match=r"fewer than the 8 last signed.*accept-rollback"):
            await _signer(engine, tmp_path).check()
        rolled = _signer(engine, tmp_path, accept_rollback=True)
        await rolled.check()
        assert Checkpoint.verify(await rolled.latest(), rolled.key.verifier()).size == 5
    # The same length with other entries (a forked history) is refused too.
    async with open_ledger(config) as engine:
        await engine.append_many([Record("other", {"n": n}) for n in range(9)])
        with pytest.raises(IntegrityError, match=r"Merkle root .* at size 5, not the signed one"):
            await _signer(engine, tmp_path).check()


def test_key_files_must_be_private(tmp_path: Path) -> None:
    path = tmp_path / "k.key"
    write_key_file(path, SignerKey.generate("a/b"))
    with pytest.raises(FileExistsError):
        write_key_file(path, SignerKey.generate("a/b"))
    os.chmod(path, 0o644)
    with pytest.raises(ProofError, match=r"readable by others.*chmod 600"):
        load_signer_key(path)


async def test_openapi_documents_the_proof_routes() -> None:
    async with (
        open_ledger(LedgerConfig(ledger_id="main")) as engine,
        app_client(_host(engine)) as api,
    ):
        spec = (await api.get("/openapi.json")).json()
    paths = spec["paths"]
    inclusion = paths["/v1/ledgers/{ledger}/proof/inclusion"]["get"]
    assert {p["name"] for p in inclusion["parameters"]} == {"ledger", "seq", "size"}
    consistency = paths["/v1/ledgers/{ledger}/proof/consistency"]["get"]
    assert {p["name"] for p in consistency["parameters"]} == {"ledger", "from", "to"}
    assert "422" in consistency["responses"]
    checkpoint = paths["/v1/ledgers/{ledger}/checkpoint"]["get"]
    assert "text/plain" in checkpoint["responses"]["200"]["content"]


async def test_a_state_file_that_cannot_be_written_publishes_nothing(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    mock_clock: trio.testing.MockClock,
) -> None:
    from nucleus_actors.daemon import checkpoints

    def broken(path: Path, origins: object) -> None:
        raise OSError(28, "No space left on device")

    async with open_ledger(LedgerConfig(ledger_id="main")) as engine:
        signer = _signer(engine, tmp_path)
        await signer.check()
        monkeypatch.setattr(checkpoints, "_write_states", broken)
        with pytest.raises(StorageError, match="cannot record the signed checkpoint"):
            await signer.latest()
        assert signer.last is None
        async with app_client(_host(engine, signer)) as api:
            response = await api.get("/v1/ledgers/main/checkpoint")
            assert response.status_code == 503
        with trio.move_on_after(1):  # the periodic signer logs it and keeps going
            await signer.run()
    assert "cannot sign a checkpoint" in caplog.text
