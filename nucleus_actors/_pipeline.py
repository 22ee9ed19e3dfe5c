"""The append pipeline: one task that carries batches of appends through hooks into storage.

Appends that arrive while a batch is in the hooks or in storage queue up and travel together as
the next batch: one `before_append` message per module per batch (each record still seen one at
a time, in order), one storage transaction per batch (group commit), and the after_append
deliveries of a batch queued to each module in one go. Commit order is the order in which
records passed the pipeline.

Invariants:
* A request is either failed with nothing stored, or stored and then answered with receipts.
* A request withdrawn by its cancelled caller before the storage stage is never stored.
* After storage, every record is queued to each running module's inbox before its request is
  answered (so an `ask` sent afterwards sees it).
"""

from __future__ import annotations

import contextlib
import logging
from collections import deque
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Final

import trio

from ._future import Future
from ._transitions import PhaseEvent
from ._tree import TreeEdge
from .errors import (
    CommitUnknown,
    Fenced,
    IntegrityError,
    InvalidRecord,
    LedgerFailed,
    LifecycleError,
    ModuleError,
    NucleusError,
    RecordRejected,
    StorageError,
)
from .hashing import ChainVerifier, chain_steps, genesis, leaf_hash
from .lifecycle import Phase
from .module._mailbox import Before
from .record import (
    Entry,
    Hash,
    Receipt,
    Record,
    committed_bytes,
    committed_entries,
    receipts_of,
)
from .storage import AppendStream, AppendStreams, IdempotencyRecord, StorageBatch, TreeTile

if TYPE_CHECKING:
    from .engine import LedgerEngine
    from .module._actor import Child

__all__ = ["Chain", "Pipeline", "Request"]

log = logging.getLogger("nucleus_actors.pipeline")

_MAX_SAFE = 2**53 - 1

HASH_SLICE: Final = 128
"""A group commit encodes and hashes this many records between checkpoints."""
STREAM_MIN: Final = 2 * HASH_SLICE
"""Smallest group commit handed to an `AppendStreams` backend slice by slice."""
STREAM_MAX: Final = 4096
STREAM_MAX_BYTES: Final = 16 << 20
"""Largest group commit streamed (records, record bytes): the backend's write statement stays
open while the batch is hashed, so its statement timeout must not become a bound on hashing
(a 100,000-record `append_many` is written the usual way, after it is hashed)."""


class Request(Future):
    """One `append` (one record) or `append_many` (all-or-nothing) waiting for the pipeline."""

    __slots__ = ("error", "idempotency", "receipts", "records", "storing", "withdrawn")

    def __init__(self, records: list[Record], idempotency: tuple[str, str] | None = None) -> None:
        super().__init__()
        self.records = records
        self.idempotency = idempotency  # (key, fingerprint): committed with the entries
        self.error: BaseException | None = None
        self.receipts: list[Receipt] | None = None
        self.storing = False  # handed to storage: no longer withdrawable
        self.withdrawn = False  # the caller was cancelled before storage: skip it

    @property
    def live(self) -> bool:
        return self.error is None and not self.withdrawn

    def fail(self, error: BaseException) -> None:
        if self.error is None and self.receipts is None:
            self.error = error
        self._resolve()

    def finish(self) -> None:
        if not self._done:
            self._resolve()

    async def wait(self) -> list[Receipt]:
        """Wait for the outcome. Cancelled before storage: withdrawn (nothing stored)."""
        try:
            await self._wait()
        except BaseException:
            if not self.storing:
                self.withdrawn = True
            raise
        if self.error is not None:
            raise self.error
        if self.receipts is None:
            raise LifecycleError("append was withdrawn")  # pragma: no cover - defensive
        return self.receipts


def _copy_module_error(err: ModuleError) -> ModuleError:
    copy = ModuleError(str(err), module_id=err.module_id)
    copy.__cause__ = err.__cause__
    return copy


class Chain:
    """The committed chain as the pipeline knows it: length, head hash, last timestamp.

    Owned by the pipeline (its only writer: after a commit, or after adopting a batch of
    unknown outcome); the engine reads it. `wait_length` waiters park on `lot`.
    """

    __slots__ = ("head", "last_ts", "length", "lot")

    def __init__(self, head: Hash) -> None:
        self.length = 0
        """Committed entries (the next seq)."""
        self.head = head
        """Chain hash after the last entry (the genesis hash when empty)."""
        self.last_ts = 0
        """Timestamp of the last entry (timestamps never go back)."""
        self.lot = trio.lowlevel.ParkingLot()

    def wake(self) -> None:
        """Wake `wait_length` waiters (after a commit, and when the ledger stops)."""
        if self.lot:
            self.lot.unpark_all()

    def advance(self, length: int, head: Hash, last_ts: int) -> None:
        self.length, self.head, self.last_ts = length, head, last_ts
        self.wake()


class _Encoded:
    """What `Pipeline._encode` built for a group commit."""

    __slots__ = ("committing", "entries", "head", "leaves", "seq", "yielded")

    def __init__(self, seq: int, head: Hash, with_leaves: bool) -> None:
        self.seq = seq  # the next seq after the entries
        self.head = head  # CHAIN after the entries
        self.entries: list[Entry] = []
        self.committing: list[tuple[Request, int]] = []  # (request, index of its first entry)
        self.leaves: list[bytes] | None = [] if with_leaves else None  # LEAF_i for the tree
        self.yielded = False  # a checkpoint ran while encoding


class Pipeline:
    """The sequencer task and its queue."""

    def __init__(self, engine: LedgerEngine) -> None:
        self._engine = engine
        self.chain = Chain(genesis(engine.config.ledger_id))
        self.appends = 0  # committed records (adopted ones included)
        self.rejects = 0  # records vetoed by a before_append
        self._queue: deque[Request] = deque()
        self._queued_records = 0
        self._wakeup = Future()  # resolved by submit() while the sequencer waits for work
        self._storing = False
        self._cancel_requested = False
        self.batches_done = 0
        self.progressed_at = 0.0  # trio time the sequencer last started work or finished a batch
        self._resync = False  # a storage failure left the head uncertain
        self._moved = False  # the last failed batch found storage's head moved under us
        self._stopped = False  # the sequencer task has ended: submit() fails at once
        self._current: list[Request] = []
        self._idle = trio.Event()
        self._idle.set()
        self._scope: trio.CancelScope | None = None
        self._store_lock = trio.Lock()  # group commits and cursor-only batches, one at a time
        # The storage is the engine's for its whole life: ask the (slow, runtime-checkable)
        # protocol once, not per batch.
        storage = engine.storage
        self._streams: AppendStreams | None = (
            storage if isinstance(storage, AppendStreams) else None
        )

    def submit(self, request: Request) -> None:
        if self._stopped:
            phase = self._engine.phase
            request.fail(
                LifecycleError(
                    f"append failed: ledger {self._engine.config.ledger_id!r} pipeline has "
                    f"stopped (phase {phase.name})",
                    phase=phase,
                )
            )
            return
        self._queue.append(request)
        self._queued_records += len(request.records)
        self._idle = trio.Event() if self._idle.is_set() else self._idle
        if not self._wakeup.done:
            self._wakeup._resolve()

    @property
    def storing(self) -> bool:
        """A batch is being written to storage right now."""
        return self._storing

    async def wait_idle(self) -> None:
        """Wait until every submitted request has been answered."""
        while self._queue or self._current:
            await self._idle.wait()

    def _take(self) -> list[Request]:
        limit = self._engine.config.max_batch
        batch = [self._queue.popleft()]
        size = len(batch[0].records)
        while self._queue and size + len(self._queue[0].records) <= limit:
            request = self._queue.popleft()
            size += len(request.records)
            batch.append(request)
        self._queued_records -= size
        return batch

    def cancel(self) -> None:
        """Stop the sequencer task (shielded from outer cancellation); queued appends fail.

        A batch being written to storage is never interrupted: the cancellation takes effect
        once storage has answered, so the pipeline always knows whether the batch landed.
        """
        self._cancel_requested = True
        if self._scope is not None and not self._storing:
            self._scope.cancel()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The sequencer. Shielded: in-flight appends finish while `stop_all` drains them, even
        when the ledger is left by cancellation; the engine cancels it when it closes."""
        try:
            with trio.CancelScope(shield=True) as self._scope:
                task_status.started()
                while True:
                    while not self._queue:
                        self._idle.set()
                        self._wakeup = Future()
                        await self._wakeup._wait()
                        self.progressed_at = trio.current_time()
                    self._current = self._take()
                    await self._process(self._current)
                    self._current = []
                    self.batches_done += 1
                    self.progressed_at = trio.current_time()
                    if not self._queue:
                        self._idle.set()
        finally:
            self._stopped = True
            # The engine is closing or failed: nothing queued will run.
            phase = self._engine.phase
            for request in [*self._current, *self._queue]:
                if request.receipts is not None:
                    request.finish()  # stored: the append succeeded
                else:
                    request.fail(
                        LifecycleError(
                            f"append withdrawn: ledger {self._engine.config.ledger_id!r} is "
                            f"{phase.name} and its pipeline stopped",
                            phase=phase,
                        )
                    )
            self._queue.clear()
            self._current = []
            self._idle.set()

    async def _process(self, batch: list[Request]) -> None:
        engine = self._engine
        live = [r for r in batch if r.live]
        for child in engine._supervisor.before_children():
            live = [r for r in live if r.live]
            if not live:
                break
            await self._before(child, live)
        live = [r for r in live if r.live]
        phase = engine.phase
        if phase not in (Phase.RUNNING, Phase.STOPPING):
            for request in live:
                request.fail(
                    LifecycleError(
                        f"append failed: ledger {engine.config.ledger_id!r} is {phase.name}",
                        phase=phase,
                    )
                )
            live = []
        if live:
            await self._commit(live)
        for request in batch:
            request.finish()

    async def _before(self, child: Child, requests: list[Request]) -> None:
        """Run one module's before_append over the batch, resending after a restart."""
        pending = [(r, i) for r in requests for i in range(len(r.records))]
        refilter = False  # the requests given are live; filter again only after a failure
        while True:
            if refilter:
                pending = [(r, i) for r, i in pending if r.live]
            if not pending or child.removed:
                return
            msg = Before([r.records[i] for r, i in pending])
            child.mailbox.put(msg)
            try:
                await msg.reply.wait()
            except ModuleError as down:  # failed, stopped or removed: fail-closed
                phase = self._engine.phase
                for request, _ in pending:
                    if phase is Phase.RUNNING:
                        request.fail(_copy_module_error(down))
                    else:  # the ledger is stopping: say so, rather than blame the module
                        failure = LifecycleError(
                            f"append failed: ledger {self._engine.config.ledger_id!r} is "
                            f"{phase.name} (module {child.id!r} was stopped before it could "
                            "check the record)",
                            phase=phase,
                        )
                        failure.__cause__ = down
                        request.fail(failure)
                return
            for (request, index), result in zip(pending, msg.results, strict=False):
                if isinstance(result, Record):
                    request.records[index] = result
                    continue
                refilter = True
                if isinstance(result, RecordRejected):
                    self.rejects += 1
                    if len(request.records) > 1:
                        result.index = index
                    request.fail(result)
                else:
                    request.fail(result)
            # Fewer results than records: the module crashed or was stopped part-way; the
            # rest go to its next incarnation (appends wait while it restarts).
            pending = pending[len(msg.results) :]
            refilter = True  # withdrawn callers, if any, are skipped on the resend

    def _timestamp(self) -> int:
        engine = self._engine
        try:
            now = engine.config.wall_clock()
        except Exception as exc:
            error = NucleusError(f"LedgerConfig.wall_clock raised {exc!r}; nothing was stored")
            raise error from exc
        if type(now) is not int or not 0 <= now <= _MAX_SAFE:
            raise NucleusError(
                f"LedgerConfig.wall_clock returned {now!r}; it must return an int of UTC "
                "microseconds since the epoch"
            )
        if now < self.chain.last_ts:
            now = self.chain.last_ts  # the wall clock stepped back: keep timestamps monotonic
        return now

    async def _commit(self, live: list[Request]) -> None:
        engine = self._engine
        if self._resync:
            try:
                await self._resync_head()
            except IntegrityError as exc:
                self._diverged(exc, live)
                return
            except Exception as exc:
                for request in live:
                    unavailable = StorageError(f"append failed, storage is unavailable: {exc!r}")
                    unavailable.__cause__ = exc
                    request.fail(unavailable)
                return
        tree = engine._tree
        try:
            ts = self._timestamp()
        except NucleusError as exc:
            for request in live:
                failure = NucleusError(str(exc))
                failure.__cause__ = exc.__cause__
                request.fail(failure)
            return
        if self._streams is not None and await self._commit_streamed(self._streams, live, ts):
            return
        encoded = await self._encode(live, ts, tree is not None, HASH_SLICE)
        if encoded.yielded and not all(request.live for request, _ in encoded.committing):
            # A caller withdrew while the batch was being hashed (at a checkpoint): encode
            # the rest again, in one step, so that nothing withdrawn is stored.
            rest = [request for request, _ in encoded.committing if request.live]
            encoded = await self._encode(rest, ts, tree is not None, 0)
        entries, committing, seq, head, leaves = (
            encoded.entries,
            encoded.committing,
            encoded.seq,
            encoded.head,
            encoded.leaves,
        )
        if not entries:
            return
        tiles, grown = tree.grow(leaves) if tree is not None and leaves else ([], None)
        await self._store_commit(entries, committing, seq, head, ts, tiles, grown)

    async def _commit_streamed(self, storage: AppendStreams, live: list[Request], ts: int) -> bool:
        """`_commit` through an `AppendStreams` backend: each slice of the batch is handed to
        storage as soon as it is hashed, so the database works while the rest is hashed.
        True when the batch was handled (stored or failed); False when it was not streamed
        (a small or huge batch, a record over `max_record_bytes`, a caller
        withdrawn at a checkpoint): nothing was stored and `_commit` goes on as usual."""
        if self._store_lock.locked():
            return False
        records = sum(len(request.records) for request in live)
        if not STREAM_MIN <= records <= STREAM_MAX:
            return False
        tree = self._engine._tree
        async with contextlib.AsyncExitStack() as stack:
            await stack.enter_async_context(self._store_lock)
            try:
                stream = await stack.enter_async_context(storage.append_stream())
            except Exception:
                return False  # the usual path meets the same error and reports it
            encoded = await self._encode_streamed(live, ts, tree is not None, stream.feed)
            if encoded is None:
                return False  # leaving the block rolls the transaction back
            leaves = encoded.leaves
            tiles, grown = tree.grow(leaves) if tree is not None and leaves else ([], None)
            await self._store_commit(
                encoded.entries, encoded.committing, encoded.seq, encoded.head, ts, tiles, grown,
                stream=stream,
            )  # fmt: skip
        return True

    async def _encode_streamed(
        self, live: list[Request], ts: int, with_leaves: bool, feed: Callable[[list[Entry]], None]
    ) -> _Encoded | None:
        """`_encode` that hands each slice of `HASH_SLICE` entries to `feed` before its
        checkpoint. None (nothing more fed) when a record is over `max_record_bytes` or the
        batch over `STREAM_MAX_BYTES` (checked first, before anything is fed), or a caller
        withdrew at a checkpoint."""
        max_bytes = self._engine.config.max_record_bytes
        seq, head = self.chain.length, self.chain.head
        out = _Encoded(seq, head, with_leaves)
        records: list[Record] = []
        datas: list[bytes] = []
        size = 0
        for request in live:
            out.committing.append((request, len(records)))
            for record in request.records:
                data = committed_bytes(record._body, seq + len(datas), ts)
                if len(data) > max_bytes:
                    return None  # the usual pass fails that request
                size += len(data)
                records.append(record)
                datas.append(data)
        if size > STREAM_MAX_BYTES:
            return None  # too long to hash with the write statement open
        entries, leaves = out.entries, out.leaves
        for start in range(0, len(datas), HASH_SLICE):
            part = datas[start : start + HASH_SLICE]
            heads = chain_steps(head, seq, part, leaves)
            made = committed_entries(records[start : start + HASH_SLICE], seq, ts, heads, part)
            entries.extend(made)
            feed(made)
            seq, head = seq + len(part), heads[-1]
            out.yielded = True
            await trio.lowlevel.checkpoint()
            if not all(request.live for request in live):
                return None
        out.seq, out.head = seq, head
        return out

    async def _store_commit(
        self,
        entries: list[Entry],
        committing: list[tuple[Request, int]],
        seq: int,
        head: Hash,
        ts: int,
        tiles: Sequence[TreeTile],
        grown: TreeEdge | None,
        *,
        stream: AppendStream | None = None,
    ) -> None:
        """Store an encoded group commit (through `stream` when given) and answer its
        requests: receipts and delivery, or each request's failure."""
        engine = self._engine
        tree = engine._tree
        for request, _ in committing:
            request.storing = True
        # Storage is never interrupted half-way: a batch is stored or not, and we learn which.
        self._storing = True
        try:
            keys = [
                IdempotencyRecord(
                    key=request.idempotency[0],
                    fingerprint=request.idempotency[1],
                    first_seq=entries[start].seq,
                    count=len(request.records),
                    created=ts,
                )
                for request, start in committing
                if request.idempotency is not None
            ]
            batch = self._batch(entries, tiles, keys)
            lock = self._store_lock
            if stream is not None:  # the caller holds the lock
                error = await self._store(batch, stream)
            elif lock.locked():  # a cursor-only batch is being stored: wait for it
                async with lock:
                    error = await self._store(batch)
            else:  # the common case: no extra schedule point on the append path
                lock.acquire_nowait()
                try:
                    error = await self._store(batch)
                finally:
                    lock.release()
            if error is None and batch.cursors:
                self._engine._supervisor.cursors_saved(batch.cursors)
        finally:
            self._storing = False
            if self._cancel_requested and self._scope is not None:
                self._scope.cancel()
        if error is not None:
            cause, known = error
            if isinstance(cause, Fenced):
                for request, _ in committing:
                    fenced = Fenced(
                        f"append failed, nothing stored: {cause}",
                        epoch=cause.epoch,
                        current=cause.current,
                    )
                    fenced.__cause__ = cause
                    request.fail(fenced)
                self.fenced(cause)
                return
            if self._moved:
                # Storage's head is neither ours nor this batch's: something else wrote to it.
                # Continue from it if it extends our chain, else fail the ledger (loudly),
                # before the callers hear of their failure.
                try:
                    await self._resync_head()
                except IntegrityError as exc:
                    self._diverged(exc, [])
                except Exception:
                    log.warning("could not re-read the storage head", exc_info=True)
            for request, _ in committing:
                # Unknown: the batch may have landed (it is adopted and delivered if so).
                failure = (
                    StorageError(f"append failed, nothing stored: {cause}")
                    if known
                    else CommitUnknown(
                        f"append failed, storage could not tell whether it was stored: {cause}"
                    )
                )
                failure.__cause__ = cause
                request.fail(failure)
            return
        if tree is not None and grown is not None:
            tree.edge = grown  # the batch's tiles are stored with it
        self.chain.advance(seq, head, ts)
        self.appends += len(entries)
        for request, start in committing:
            request.receipts = receipts_of(entries[start : start + len(request.records)], ts)
        await self._deliver([(e.record, e.hash) for e in entries])

    async def _deliver(self, items: list[tuple[Record, Hash]]) -> None:
        """Queue after_append deliveries to every running module, in commit order."""
        engine = self._engine
        # Every module first gets what fits in its inbox, so a stalled module never holds back
        # the others' deliveries; only then wait (BLOCK) for the ones that are full.
        blocked = []
        for child in engine._supervisor.after_children():
            done = child.mailbox.deliver_nowait(items, child.overflow)
            if done < len(items):
                blocked.append((child, items[done:]))
        if len(blocked) == 1:
            child, rest = blocked[0]
            await child.mailbox.deliver(rest, child.overflow)
        elif blocked:
            async with trio.open_nursery() as nursery:
                for child, rest in blocked:
                    nursery.start_soon(child.mailbox.deliver, rest, child.overflow)

    async def _encode(
        self,
        live: list[Request],
        ts: int,
        with_leaves: bool,
        slice_records: int,
    ) -> _Encoded:
        """Canonical bytes, LEAF and CHAIN hashes of the live requests' records, from the
        committed head. A request with a record over `max_record_bytes` fails here.

        With `slice_records > 0`, checkpoints after every `slice_records` records, and once at
        the end when there were at least that many (the tiles and the storage rows follow), so
        a large batch (1,000 records of 4 KiB: ~10 ms) does not hold the event loop in one step;
        nothing is stored or adopted yet, and the sequencer's shield keeps outer cancellations
        out. A caller may withdraw at such a checkpoint: `yielded` tells `_commit` to look.
        """
        max_bytes = self._engine.config.max_record_bytes
        seq, head = self.chain.length, self.chain.head
        out = _Encoded(seq, head, with_leaves)
        entries, leaves = out.entries, out.leaves
        work = 0  # records encoded and hashed since the last checkpoint
        for request in live:
            datas: list[bytes] = []
            for index, record in enumerate(request.records):
                work += 1
                if work == slice_records:
                    work = 0
                    out.yielded = True
                    await trio.lowlevel.checkpoint()
                data = committed_bytes(record._body, seq + len(datas), ts)
                if len(data) > max_bytes:
                    where = f" (record {index} of the batch)" if len(request.records) > 1 else ""
                    request.fail(
                        InvalidRecord(
                            f"record is {len(data)} canonical bytes after before_append, over "
                            f"max_record_bytes={max_bytes}{where}"
                        )
                    )
                    break
                datas.append(data)
            else:
                first = len(entries)
                heads = chain_steps(head, seq, datas, leaves)
                entries.extend(committed_entries(request.records, seq, ts, heads, datas))
                seq += len(heads)
                if heads:
                    head = heads[-1]
                out.committing.append((request, first))
        out.seq, out.head = seq, head
        if slice_records and len(entries) >= slice_records and work:
            # The rest of the group commit (tree tiles, storage rows) is one more step.
            out.yielded = True
            await trio.lowlevel.checkpoint()
        return out

    def _batch(
        self,
        entries: list[Entry],
        tiles: Sequence[TreeTile] = (),
        keys: list[IdempotencyRecord] | None = None,
    ) -> StorageBatch:
        """The one `StorageBatch` of this group commit: its entries, built on the ledger's head
        (`prev`), and whatever else must commit atomically with them (cursors, tree tiles,
        idempotency keys)."""
        return StorageBatch(
            entries=entries,
            prev=self.chain.head,
            cursors=self._engine._supervisor.dirty_cursors(),
            tree=tiles,
            idempotency=keys or (),
        )

    async def _store(
        self, batch: StorageBatch, stream: AppendStream | None = None
    ) -> tuple[BaseException, bool] | None:
        """Append to storage (commit `stream`, when given). None if stored; else (error,
        known) where `known` says that nothing of the batch was stored (False: the backend
        could not tell us)."""
        storage = self._engine.storage
        entries = batch.entries
        self._moved = False
        try:
            if stream is not None:
                await stream.commit(batch)
            else:
                await storage.append(batch)
        except Fenced as exc:
            return exc, True  # the fence refused the whole batch: nothing stored
        except Exception as exc:
            try:
                length, head = await storage.head()
            except Exception:
                self._resync = True  # re-read the head before the next batch
                return exc, False
            if entries and length == entries[-1].seq + 1 and head == entries[-1].hash:
                return None  # committed although the backend reported an error
            chain = self.chain
            if (length, head) != (chain.length, chain.head):
                log.error(
                    "ledger %r: storage head (%d, %s) differs from the ledger's (%d, %s) after "
                    "a failed append: another writer? re-reading it",
                    self._engine.config.ledger_id, length, head.hex(), chain.length,
                    chain.head.hex(),
                )  # fmt: skip
                self._moved = self._resync = True
            return exc, True
        return None

    async def flush_cursors(self) -> None:
        """Store the durable modules' cursors that moved since they were last stored, in a
        batch of their own (the cursor flusher every `cursor_interval`, and at stop). Never
        concurrent with a group commit; errors are logged (the cursor stays dirty)."""
        supervisor = self._engine._supervisor
        async with self._store_lock:
            cursors = supervisor.dirty_cursors()
            if not cursors:
                supervisor.cursors_saved({})
                return
            try:
                await self._engine.storage.append(StorageBatch(entries=[], cursors=cursors))
            except Fenced as exc:
                self.fenced(exc)
                return
            except Exception:
                log.warning("could not store module cursors %r", cursors, exc_info=True)
                return
            supervisor.cursors_saved(cursors)

    def fenced(self, error: Fenced) -> None:
        """Storage refused a batch because another writer holds the ledger (a newer epoch):
        stop writing for good. The ledger fails with `LedgerFailed` caused by the `Fenced`
        error (its modules stop; the daemon turns the ledger into a standby)."""
        engine = self._engine
        if engine.fenced is not None:
            return
        engine.fenced = error
        failure = LedgerFailed(
            f"ledger {engine.config.ledger_id!r} stopped writing: it was fenced, another "
            f"writer holds it ({error})",
            phase=Phase.FAILED,
        )
        failure.__cause__ = error
        log.error("%s", failure)
        for request in [*self._queue]:
            request.fail(Fenced(str(error), epoch=error.epoch, current=error.current))
        self._queue.clear()
        self._queued_records = 0
        supervisor = engine._supervisor
        if supervisor.phase is Phase.RUNNING:
            supervisor.fire(PhaseEvent.ESCALATED)
        engine._escalated(failure)

    def _diverged(self, error: IntegrityError, requests: list[Request]) -> None:
        """Storage holds a chain that does not continue the ledger's (entries lost or
        overwritten, another writer): fail the ledger, loudly. Appending on would 503 forever
        while the ledger looked ready."""
        engine = self._engine
        self._resync = False
        failure = LedgerFailed(
            f"ledger {engine.config.ledger_id!r} failed: its storage no longer holds the chain "
            f"it committed ({self.chain.length} entries, head {self.chain.head.hex()}): "
            f"{error}; "
            "was the ledger written by another process (a second writer through another path "
            "to the same file)?",
            phase=Phase.FAILED,
        )
        failure.__cause__ = error
        log.critical("%s", failure)
        for request in requests:
            request.fail(failure)
        supervisor = engine._supervisor
        if supervisor.phase is Phase.RUNNING:  # (while STOPPING the stop goes on; the block
            supervisor.fire(PhaseEvent.ESCALATED)  # still ends with LedgerFailed)
        engine._escalated(failure)

    async def settle_unknown(self) -> None:
        """Before the modules stop: adopt (and deliver) a batch of unknown outcome that did
        land, so that it reaches the modules even when no later append resyncs the head.
        Only while the pipeline is idle; errors are logged, not raised."""
        if not self._resync or self._queue or self._current:
            return
        try:
            await self._resync_head()
        except Exception:
            log.warning("could not re-read the storage head before stopping", exc_info=True)

    async def _resync_head(self) -> None:
        """After a storage failure of unknown outcome, continue from what storage holds.

        A batch that landed although its callers were told the outcome is unknown is adopted:
        its entries are checked against the chain and delivered like any commit (every module
        sees every committed entry).

        Raises:
            IntegrityError: storage holds fewer entries than the ledger committed, another
                head at the same length, or entries beyond our head that do not continue the
                chain.
        """
        engine = self._engine
        chain = self.chain
        length, head = await engine.storage.head()
        if length < chain.length or (length == chain.length and head != chain.head):
            raise IntegrityError(
                f"storage head ({length}, {head.hex()}) is not the ledger's head "
                f"({chain.length}, {chain.head.hex()}) nor a continuation of it",
                seq=min(length, chain.length),
            )
        if length != chain.length:
            verifier = ChainVerifier(chain.head, chain.length)
            adopted: list[Entry] = []
            entries = engine.storage.read(chain.length, length)
            async for entry in entries:
                verifier.feed(entry)
                adopted.append(entry)
            if verifier.length != length or verifier.head != head:
                raise IntegrityError(
                    f"storage head ({length}, {head.hex()}) does not follow the chain",
                    seq=verifier.length,
                )
            tree = engine._tree
            if tree is not None and adopted:
                try:
                    await tree.reload(length)  # a landed batch of ours carried its tiles
                except IntegrityError:
                    # entries another writer stored carry none: extend the tree over them
                    # and store their tiles, so proofs keep covering every entry
                    tiles, grown = tree.grow([leaf_hash(e.canonical) for e in adopted])
                    if tiles:
                        async with self._store_lock:  # not beside a cursor-only batch
                            await engine.storage.append(StorageBatch(entries=(), tree=tiles))
                    tree.edge = grown
            last_ts = max(chain.last_ts, adopted[-1].timestamp) if adopted else chain.last_ts
            self.appends += len(adopted)
            chain.advance(length, head, last_ts)
            await self._deliver([(e.record, e.hash) for e in adopted])
        self._resync = False
