"""A load generator for failover tests: N threads appending unique records to whichever daemon
writes the ledger, recording every acknowledged append (and when, and from which daemon)."""

from __future__ import annotations

import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import httpx
import psycopg

from nucleus_actors.hashing import ChainVerifier, decode_entry, genesis


@dataclass(frozen=True, slots=True)
class Ack:
    id: str
    seq: int
    hash: str
    at: float
    url: str


@dataclass
class Load:
    """Appenders that follow the writer among `urls` (re-found via `/readyz?role=writer`)."""

    urls: list[str]
    threads: int = 64
    ledger: str = "main"
    tag: str = "load"
    acks: list[Ack] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)
    _writer: str | None = None
    _stop: threading.Event = field(default_factory=threading.Event)
    _known: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _workers: list[threading.Thread] = field(default_factory=list)

    def set_urls(self, urls: list[str]) -> None:
        with self._lock:
            self.urls = list(urls)
            if self._writer not in self.urls:
                self._writer = None
                self._known.clear()

    def _discover(self) -> None:
        """One thread finds the writer (so that appenders waiting for a takeover do not
        flood the daemons with probes): every 0.1 s while none is known."""
        with httpx.Client(timeout=1) as client:
            while not self._stop.is_set():
                if self._writer is None:
                    for url in list(self.urls):
                        try:
                            found = client.get(f"{url}/readyz", params={"role": "writer"})
                        except httpx.HTTPError:
                            continue
                        if found.is_success:
                            with self._lock:
                                self._writer = url
                                self._known.set()
                            break
                time.sleep(0.1)

    def _run(self) -> None:
        with httpx.Client(timeout=20) as client:
            while not self._stop.is_set():
                url = self._writer
                if url is None:
                    self._known.wait(0.1)
                    continue
                rid = uuid.uuid4().hex
                body = {"kind": self.tag, "payload": {"id": rid, "via": url}}
                try:
                    response = client.post(f"{url}/v1/ledgers/{self.ledger}/records", json=body)
                except httpx.HTTPError as exc:
                    self._failed(type(exc).__name__, url)
                    continue
                if response.status_code == 201:
                    data = response.json()
                    ack = Ack(rid, int(data["seq"]), str(data["hash"]), time.monotonic(), url)
                    with self._lock:
                        self.acks.append(ack)
                else:
                    slug = str(response.json().get("type", response.status_code)).rsplit("/", 1)
                    self._failed(slug[-1], url)

    def _failed(self, what: str, url: str) -> None:
        with self._lock:
            self.errors[what] = self.errors.get(what, 0) + 1
            if self._writer == url:
                self._writer = None
                self._known.clear()
        time.sleep(0.05)

    def start(self) -> None:
        finder = threading.Thread(target=self._discover, daemon=True)
        finder.start()
        self._workers.append(finder)
        for _ in range(self.threads):
            worker = threading.Thread(target=self._run, daemon=True)
            worker.start()
            self._workers.append(worker)

    def stop(self) -> None:
        self._stop.set()
        for worker in self._workers:
            worker.join(30)

    def first_ack_after(self, when: float, not_from: str | None = None) -> Ack | None:
        with self._lock:
            later = [a for a in self.acks if a.at > when and a.url != not_from]
        return min(later, key=lambda a: a.at) if later else None


def stored(dsn: str, schema: str, ledger: str = "main") -> list[Any]:
    """Every entry of the schema, its chain verified from the genesis (AssertionError if not)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f'SET search_path TO "{schema}"')
        rows = conn.execute("SELECT seq, canonical, hash FROM entries ORDER BY seq").fetchall()
    verifier = ChainVerifier(genesis(ledger))
    entries = []
    for seq, canonical, digest in rows:
        entry = decode_entry(int(seq), bytes(canonical), bytes(digest))
        verifier.feed(entry)  # IntegrityError if the chain breaks
        entries.append(entry)
    assert verifier.length == len(rows)
    return entries


def check_acks(acks: list[Ack], entries: list[Any]) -> None:
    """Every acknowledged append is stored exactly once, at its seq, with its hash."""
    by_id: dict[str, list[Any]] = {}
    for entry in entries:
        by_id.setdefault(str(entry.record.payload["id"]), []).append(entry)
    duplicated = {key: [e.seq for e in found] for key, found in by_id.items() if len(found) > 1}
    assert not duplicated, f"records stored more than once: {duplicated}"
    for ack in acks:
        found = by_id.get(ack.id)
        assert found, f"acknowledged append {ack} is not stored"
        assert (found[0].seq, found[0].hash.hex()) == (ack.seq, ack.hash), (ack, found[0])
