"""End to end: `nucleus keygen`, a daemon signing checkpoints, `nucleus prove`, `nucleus verify
--checkpoint`, and the refusal to sign backwards after an older copy of the ledger file is
restored (unless `nucleus run --accept-rollback`)."""

from __future__ import annotations

import shutil
import sqlite3
import stat
from pathlib import Path
from typing import Any

from nucleus_actors.checkpoint import Checkpoint, VerifierKey

from .conftest import DaemonProcess, client, nucleus, toml_str

ORIGIN = "test.example/orders"


def _config(tmp_path: Path) -> Path:
    config = tmp_path / "nucleus.toml"
    config.write_text(
        "[[ledgers]]\n"
        'id = "orders"\n'
        f"storage = {toml_str(tmp_path / 'orders.db')}\n"
        'checkpoint_key = "orders.key"\n'
        f'checkpoint_origin = "{ORIGIN}"\n'
        "checkpoint_interval = 3600.0\n"
    )
    return config


def _append(url: str, n: int) -> None:
    with client(url) as api:
        for i in range(n):
            response = api.post("/v1/ledgers/orders/records", json={"kind": "k", "payload": i})
            assert response.status_code == 201, response.text


def _checkpoint(url: str, vkey: VerifierKey) -> tuple[str, Checkpoint]:
    with client(url) as api:
        response = api.get("/v1/ledgers/orders/checkpoint")
    assert response.status_code == 200, response.text
    return response.text, Checkpoint.verify(response.text, vkey)


def _backup(src: Path, dest: Path) -> None:
    with sqlite3.connect(src) as source, sqlite3.connect(dest) as target:
        source.backup(target)
    source.close()
    target.close()


def test_keygen_writes_a_private_key_and_refuses_to_overwrite(tmp_path: Path) -> None:
    out = tmp_path / "k.key"
    done = nucleus("keygen", ORIGIN, "--out", str(out))
    assert done.returncode == 0, done.stderr
    vkey = VerifierKey.parse(done.stdout.strip())
    assert vkey.name == ORIGIN
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    assert out.read_text().startswith(f"PRIVATE+KEY+{ORIGIN}+")
    again = nucleus("keygen", ORIGIN, "--out", str(out))
    assert again.returncode == 2
    assert "cannot write the key file" in again.stderr
    bad = nucleus("keygen", "has space", "--out", str(tmp_path / "x.key"))
    assert bad.returncode == 2


def test_sign_prove_verify_and_refuse_a_restored_backup(tmp_path: Path, start_daemon: Any) -> None:
    made = nucleus("keygen", ORIGIN, "--out", str(tmp_path / "orders.key"))
    assert made.returncode == 0, made.stderr
    vkey_text = made.stdout.strip()
    vkey = VerifierKey.parse(vkey_text)
    config = _config(tmp_path)
    db = tmp_path / "orders.db"

    daemon = start_daemon(config)
    _append(daemon.url, 5)
    note5, cp5 = _checkpoint(daemon.url, vkey)
    assert cp5.size == 5
    assert daemon.stop() == 0
    _backup(db, tmp_path / "backup.db")
    (tmp_path / "cp5.note").write_text(note5)

    daemon = start_daemon(config)
    _append(daemon.url, 7)
    note12, cp12 = _checkpoint(daemon.url, vkey)
    assert cp12.size == 12
    (tmp_path / "cp12.note").write_text(note12)
    url = ["--url", daemon.url, "--key", vkey_text]
    proved = nucleus("prove", "inclusion", "9", *url)
    assert proved.returncode == 0, proved.stderr
    assert "entry 9 of 'orders' is in checkpoint 'test.example/orders' at size 12" in proved.stdout
    outside = nucleus("prove", "inclusion", "3", *url, "--checkpoint", str(tmp_path / "cp5.note"))
    assert outside.returncode == 0, outside.stderr
    beyond = nucleus("prove", "inclusion", "7", *url, "--checkpoint", str(tmp_path / "cp5.note"))
    assert beyond.returncode == 1
    grew = nucleus("prove", "consistency", str(tmp_path / "cp5.note"), *url)
    assert grew.returncode == 0, grew.stderr
    assert "size 5 is a prefix of the one at size 12" in grew.stdout
    other = nucleus("keygen", ORIGIN, "--out", str(tmp_path / "other.key")).stdout.strip()
    wrong_key = nucleus("prove", "inclusion", "9", "--url", daemon.url, "--key", other)
    assert wrong_key.returncode == 1
    assert "no signature from a known key" in wrong_key.stderr
    assert daemon.stop() == 0

    key_args = ["--key", vkey_text]
    for note in ("cp5.note", "cp12.note"):
        checked = nucleus("verify", str(db), "--checkpoint", str(tmp_path / note), *key_args)
        assert checked.returncode == 0, checked.stderr
        assert "matches checkpoint 'test.example/orders'" in checked.stdout

    # Restore the older copy: the file no longer reaches the last signed checkpoint.
    for suffix in ("", "-wal", "-shm"):
        Path(f"{db}{suffix}").unlink(missing_ok=True)
    shutil.copyfile(tmp_path / "backup.db", db)
    short = nucleus("verify", str(db), "--checkpoint", str(tmp_path / "cp12.note"), *key_args)
    assert short.returncode == 1
    assert "the checkpoint covers 12 entries, the file holds 5" in short.stderr
    refused = DaemonProcess(config)
    try:
        assert refused.wait() == 1
    finally:
        refused.close()
    assert "fewer than the 12 last signed" in refused.log
    assert "--accept-rollback" in refused.log

    accepted = start_daemon(config, "--accept-rollback")
    assert "--accept-rollback given" in accepted.wait_log("accept-rollback given")
    _, cp = _checkpoint(accepted.url, vkey)
    assert (cp.size, cp.root) == (5, cp5.root)
    assert accepted.stop() == 0
