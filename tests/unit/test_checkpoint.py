"""Signed notes and checkpoints: the C2SP and Go examples, our own keys, and every refusal."""

from __future__ import annotations

import base64
import os
import subprocess
import sys
from pathlib import Path

import pytest

from nucleus_actors import Hash, ProofError
from nucleus_actors.checkpoint import (
    Checkpoint,
    SignerKey,
    VerifierKey,
    open_note,
    sign_note,
)
from nucleus_actors.hashing import genesis

# The example of the C2SP signed-note specification (section "Example"): its verifier key and
# its signed note, copied verbatim.
SPEC_VKEY = "example.com/foo+530d903a+AekyeRrm56hApGFkyQR4ZCbV54Id2LKaANYcrnKv3U2k"
SPEC_NOTE = (
    "This is an example message.\n"
    "\n"
    "\u2014 example.com/foo Uw2QOkn8srV1yJGh2VYRlL1Tnagv1YEq6TfXppzi2ONncAlTgK7Ztg1ERYNZXsYjOBH3mFX"
    "mRKuwHjG1Yu72IneyaQM=\n"
)

# The example of golang.org/x/mod/sumdb/note (package documentation): signer, verifier, note.
GO_SKEY = "PRIVATE+KEY+PeterNeumann+c74f20a3+AYEKFALVFGyNhPJEMzD1QIDr+Y7hfZx09iUvxdXHKDFz"
GO_VKEY = "PeterNeumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW"
GO_TEXT = (
    "If you think cryptography is the answer to your problem,\n"
    "then you don't know what your problem is.\n"
)
GO_NOTE = (
    GO_TEXT + "\n\u2014 PeterNeumann x08go/ZJkuBS9UG/SffcvIAQxVBtiFupLLr8pAcElZInNIuGUgYN1FFYC2pZS"
    "NXgKvqfqdngotpRZb6KE6RyyBwJnAM=\n"
)


def test_spec_example_verifies() -> None:
    key = VerifierKey.parse(SPEC_VKEY)
    assert key.name == "example.com/foo"
    assert key.key_id == 0x530D903A
    assert str(key) == SPEC_VKEY
    opened = open_note(SPEC_NOTE, [key])
    assert opened.text == "This is an example message.\n"
    assert opened.verified == ("example.com/foo",)
    assert open_note(SPEC_NOTE.encode(), [key]).text == opened.text


def test_spec_example_tampered_is_refused() -> None:
    key = VerifierKey.parse(SPEC_VKEY)
    with pytest.raises(ProofError, match=r"known key 'example\.com/foo' does not verify"):
        open_note(SPEC_NOTE.replace("example message", "example massage"), [key])


def test_go_example_signs_byte_for_byte() -> None:
    signer = SignerKey.parse(GO_SKEY)
    assert str(signer) == GO_SKEY
    assert str(signer.verifier()) == GO_VKEY
    assert sign_note(GO_TEXT, [signer]) == GO_NOTE  # Ed25519 is deterministic
    assert open_note(GO_NOTE, [VerifierKey.parse(GO_VKEY)]).text == GO_TEXT
    assert "AYEKFALV" not in repr(signer)
    # A verifier key whose base64 holds a '+' (transparency-dev/formats note tests).
    plus = "TEST+7997405c+AQcC+FTVKf0jlTdHDY3rbevmnKxxPjigCXlVtGe6RIr6"
    assert str(VerifierKey.parse(plus)) == plus


def test_unknown_keys_are_ignored_but_one_known_must_verify() -> None:
    spec, go = VerifierKey.parse(SPEC_VKEY), VerifierKey.parse(GO_VKEY)
    other = SignerKey.generate("example.com/foo")  # same name, another key ID
    cosigned = SPEC_NOTE + sign_note("This is an example message.\n", [other]).split("\n\n")[1]
    assert open_note(cosigned, [spec]).verified == ("example.com/foo",)
    assert open_note(cosigned, [spec, other.verifier()]).verified == (
        "example.com/foo",
        "example.com/foo",
    )
    with pytest.raises(ProofError, match=r"no signature from a known key \(PeterNeumann\)"):
        open_note(SPEC_NOTE, [go])
    # Same name and key ID as a known key, but a bad signature: the whole note is rejected.
    forged = SPEC_NOTE.replace("Uw2QOkn8", "Uw2QOkn9")
    with pytest.raises(ProofError, match="does not verify"):
        open_note(forged, [spec])


@pytest.mark.parametrize(
    ("note", "message"),
    [
        ("no signatures\n", "text, a blank line"),
        ("text\n\n", "em dash"),
        ("text\n\n\u2014 example.com/foo\n", "'— name base64'"),
        ("text\n\n\u2014 example.com/foo !!!\n", "not standard base64"),
        ("text\n\n\u2014 example.com/foo AAAA\n", "too short"),
        ("text\n\n- example.com/foo AAAAAAAA\n", "em dash"),
        ("te\tx\n\n\u2014 a AAAAAAAA\n", "control characters"),
        ("text\n\n\u2014 a+b AAAAAAAA\n", "without spaces or '\\+'"),
        ("text\n\n\u2014 example.com/foo AAAAAAAA", "text, a blank line"),
    ],
)
def test_malformed_notes(note: str, message: str) -> None:
    with pytest.raises(ProofError, match=message):
        open_note(note, [VerifierKey.parse(SPEC_VKEY)])


def test_bad_utf8_and_bad_keys() -> None:
    with pytest.raises(ProofError, match="valid UTF-8"):
        open_note(b"\xff\n\n\xe2\x80\x94 a AAAAAAAA\n", [])
    for bad, message in [
        ("example.com/foo+530d903b+AekyeRrm56hApGFkyQR4ZCbV54Id2LKaANYcrnKv3U2k", "does not match"),
        ("example.com/foo+530d903a+AekyeRrm56hApGFkyQR4ZCbV54Id2LKaANYcrnKv3U2", "base64"),
        ("example.com/foo+530d903a", "name\\+keyid\\+base64"),
        ("example.com/foo+530D903A+AekyeRrm56hApGFkyQR4ZCbV54Id2LKaANYcrnKv3U2k", "lowercase hex"),
        ("example.com/foo+530d903a+AgkyeRrm56hApGFkyQR4ZCbV54Id2LKaANYcrnKv3U2k", "Ed25519"),
    ]:
        with pytest.raises(ProofError, match=message):
            VerifierKey.parse(bad)
    with pytest.raises(ProofError, match="PRIVATE\\+KEY"):
        SignerKey.parse(GO_VKEY)
    with pytest.raises(ProofError, match="does not match"):
        SignerKey.parse(GO_SKEY.replace("c74f20a3", "c74f20a4"))
    with pytest.raises(ProofError, match="key name"):
        SignerKey.generate("has space")


def _checkpoint(size: int = 5) -> Checkpoint:
    return Checkpoint(
        origin="host.example/orders",
        size=size,
        root=Hash(bytes(range(32))),
        chain=genesis("orders"),
    )


def test_checkpoint_body_is_a_tlog_checkpoint() -> None:
    checkpoint = _checkpoint()
    body = checkpoint.body()
    lines = body.split("\n")
    assert lines[:3] == [
        "host.example/orders",
        "5",
        base64.b64encode(bytes(range(32))).decode(),
    ]
    assert lines[3] == "chain " + genesis("orders").hex()
    assert body.endswith("\n")
    assert lines[4] == ""
    assert Checkpoint.parse(body) == checkpoint
    no_chain = Checkpoint(origin="o", size=0, root=checkpoint.root, chain=None)
    assert Checkpoint.parse(no_chain.body()) == no_chain
    assert checkpoint.to_json()["chain"] == genesis("orders").hex()


def test_signed_checkpoint_round_trip() -> None:
    signer = SignerKey.generate("host.example/orders")
    verifier = VerifierKey.parse(str(signer.verifier()))
    note = _checkpoint().sign(signer)
    assert Checkpoint.verify(note, verifier) == _checkpoint()
    with pytest.raises(ProofError, match=r"origin is 'host\.example/orders', expected 'x/y'"):
        Checkpoint.verify(note, verifier, origin="x/y")
    with pytest.raises(ProofError, match="does not verify"):
        Checkpoint.verify(note.replace("\n5\n", "\n6\n"), verifier)
    with pytest.raises(ProofError, match="no signature from a known key"):
        Checkpoint.verify(note, SignerKey.generate("host.example/orders").verifier())


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("o\n5\n", "three non-empty lines"),
        ("o\n05\nAAAA\n", "decimal uint64"),
        ("o\n-5\nAAAA\n", "decimal uint64"),
        ("o\n18446744073709551616\nAAAA\n", "decimal uint64"),
        ("o\n5\nAAAA\n", "32 bytes, got 3"),
        ("o\n5\n" + "A" * 43 + "=\n\nx\n", "non-empty"),
        ("o\n5\n" + "A" * 43 + "=\nchain zz\n", "64 hex digits"),
        ("o\n5\n" + "A" * 43 + "=", "end with a newline"),
    ],
)
def test_malformed_checkpoints(text: str, message: str) -> None:
    with pytest.raises(ProofError, match=message):
        Checkpoint.parse(text)


def test_importing_checkpoint_imports_no_runtime() -> None:
    code = (
        "import sys, nucleus_actors.checkpoint, nucleus_actors.proofs\n"
        "heavy = {'trio', 'fastapi', 'hypercorn', 'pydantic'} & set(sys.modules)\n"
        "print(sorted(heavy))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]", out.stderr
