"""The modules shipped with the daemon: RequireFields and KindCounter (in process)."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from nucleus_actors import (
    Entry,
    Hash,
    LedgerConfig,
    LedgerEngine,
    ModuleError,
    ModuleSpec,
    Record,
    RecordRejected,
    RegistryError,
    open_ledger,
)
from nucleus_actors.daemon.modules import (
    JsonlMirror,
    JsonSchemaValidator,
    KindCounter,
    RequireFields,
    SchemaViolation,
)
from nucleus_actors.daemon.wire import entry_line, export_header
from nucleus_actors.hashing import genesis
from nucleus_actors.storage import MemoryStorage, SQLiteStorage


def require(**config: object) -> ModuleSpec[RequireFields]:
    return ModuleSpec(RequireFields, config=config)


async def test_require_fields_rejects_missing_fields_of_checked_kinds() -> None:
    spec = require(fields=["customer", "total"], kinds=["order."])
    async with open_ledger(LedgerConfig(ledger_id="t"), modules=[spec]) as engine:
        await engine.append(Record("order.created", {"customer": "ada", "total": 3}))
        await engine.append(Record("note", "not an order: not checked"))
        with pytest.raises(RecordRejected, match=r"is missing 'total' in its payload") as info:
            await engine.append(Record("order.created", {"customer": "ada"}))
        assert info.value.module_id == "require-fields"
        with pytest.raises(RecordRejected, match=r"needs an object payload with 'customer'"):
            await engine.append(Record("order.paid", [1, 2]))
        assert engine.state.length == 2


async def test_require_fields_without_kinds_checks_everything() -> None:
    async with open_ledger(LedgerConfig(ledger_id="t"), modules=[require(fields=["id"])]) as e:
        with pytest.raises(RecordRejected, match=r"record of kind 'note' is missing 'id'"):
            await e.append(Record("note", {}))


@pytest.mark.parametrize(
    "config",
    [{}, {"fields": "customer"}, {"fields": []}, {"fields": [1]}, {"fields": ["a"], "kinds": [""]}],
)
async def test_require_fields_bad_config_fails_startup(config: dict[str, object]) -> None:
    with pytest.raises(ModuleError, match=r"require-fields") as info:
        async with open_ledger(LedgerConfig(ledger_id="t"), modules=[require(**config)]):
            pass
    assert "must be a non-empty list of non-empty strings" in str(info.value.__cause__)


def counter(**config: object) -> ModuleSpec[KindCounter]:
    return ModuleSpec(KindCounter, durable=True, config=config)


class CountingSQLite(SQLiteStorage):
    """Counts the entries its `read` yields (catch-up, `get`, rebuilds all read through it)."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.entries_read = 0

    def read(self, start: int, stop: int | None = None) -> AsyncIterator[Entry]:
        inner = super().read(start, stop)

        async def counted() -> AsyncIterator[Entry]:
            async for entry in inner:
                self.entries_read += 1
                yield entry

        return counted()


def test_kind_counter_must_be_durable() -> None:
    engine = LedgerEngine(LedgerConfig(ledger_id="t"))
    with pytest.raises(RegistryError, match=r"defines resume_after but is not durable"):
        engine.register(KindCounter)
    engine.register(counter())


async def test_kind_counter_counts_exactly_once_across_restarts_and_reopens() -> None:
    storage = MemoryStorage()
    config = LedgerConfig(ledger_id="t")
    async with open_ledger(config, storage=storage, modules=[counter()]) as engine:
        await engine.append_many([Record("a", 1), Record("b", 2), Record("a", 3)])
        handle = engine.modules.get(KindCounter)
        assert await handle.ask(lambda m: dict(m.counts)) == {"a": 2, "b": 1}
        # A restart (a fresh instance, no state file) is fed the ledger again: no double count.
        await engine.terminate("kind-counter")
        await engine.append(Record("b", 4))
        await engine.restart("kind-counter")
        await engine.append(Record("c", 5))
        assert await handle.ask(lambda m: dict(m.counts)) == {"a": 2, "b": 2, "c": 1}

    # Reopening the same storage: counted again by the runtime's catch-up.
    async with open_ledger(config, storage=storage, modules=[counter()]) as engine:
        counts = await engine.modules.get(KindCounter).ask(lambda m: dict(m.counts))
        assert counts == {"a": 2, "b": 2, "c": 1}


async def test_kind_counter_reused_instance_resumes_without_a_state_file() -> None:
    instance = KindCounter()
    spec = ModuleSpec(instance, durable=True)
    async with open_ledger(LedgerConfig(ledger_id="t"), modules=[spec]) as engine:
        await engine.append_many([Record("a", n) for n in range(5)])
        await engine.terminate("kind-counter")
        await engine.append(Record("b", 5))
        await engine.restart("kind-counter")
        handle = engine.modules.get(KindCounter)
        assert await handle.ask(lambda m: dict(m.counts)) == {"a": 5, "b": 1}
        assert handle.status.processed == 6  # the restart was fed only seq 5


async def test_kind_counter_with_state_does_not_reread_the_ledger(tmp_path: Path) -> None:
    config = LedgerConfig(ledger_id="t")
    state = str(tmp_path / "counts.db")
    spec = counter(state=state, index=True, snapshot_every=100)
    kinds = ["a", "b", "c"]
    async with open_ledger(
        config, storage=SQLiteStorage(tmp_path / "l.db"), modules=[spec]
    ) as engine:
        for start in range(0, 1000, 250):
            await engine.append_many([Record(kinds[n % 3], n) for n in range(start, start + 250)])
        await engine.modules.get(KindCounter).ask(lambda m: None)
    storage = CountingSQLite(tmp_path / "l.db")
    async with open_ledger(config, storage=storage, modules=[spec]) as engine:
        handle = engine.modules.get(KindCounter)
        assert await handle.ask(lambda m: dict(m.counts)) == {"a": 334, "b": 333, "c": 333}
        assert await handle.ask(KindCounter.seqs, "b", 990) == [991, 994, 997]
        # The engine reads its last entry at open, the counter the entry at its position
        # (to check the hash): nothing else, whatever the ledger's length.
        assert storage.entries_read == 2
        assert handle.status.processed == 0
        assert handle.status.cursor == 999
        await engine.append(Record("d", 1000))
        assert await handle.ask(KindCounter.count, "d") == 1


async def test_kind_counter_state_of_another_history_is_rebuilt(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    state = str(tmp_path / "counts.db")
    async with open_ledger(
        LedgerConfig(ledger_id="t"),
        storage=SQLiteStorage(tmp_path / "one.db"),
        modules=[counter(state=state)],
    ) as engine:
        await engine.append_many([Record("a", n) for n in range(5)])
    # Same ledger id, another history (a restore, a new file): the snapshot does not match.
    async with open_ledger(
        LedgerConfig(ledger_id="t"),
        storage=SQLiteStorage(tmp_path / "two.db"),
        modules=[counter(state=state)],
    ) as engine:
        await engine.append_many([Record("z", n) for n in range(7)])
        counts = await engine.modules.get(KindCounter).ask(lambda m: dict(m.counts))
    assert counts == {"z": 7}
    assert any("counting it again" in r.getMessage() for r in caplog.records)
    # Another ledger id: a configuration error, the file is left alone.
    with pytest.raises(ModuleError, match=r"kind-counter") as info:
        async with open_ledger(LedgerConfig(ledger_id="other"), modules=[counter(state=state)]):
            pass
    assert "holds the counts of ledger 't', not 'other'" in str(info.value.__cause__)


async def test_kind_counter_ignores_a_redelivery_after_its_own_crash() -> None:
    class Fragile(KindCounter):
        calls = 0

        async def after_append(self, record: Record, hash: Hash) -> None:
            await super().after_append(record, hash)
            Fragile.calls += 1
            if Fragile.calls == 1:
                raise RuntimeError("crash after counting")  # redelivered to the new incarnation

    fragile = Fragile()
    spec = ModuleSpec(fragile, durable=True)
    async with open_ledger(LedgerConfig(ledger_id="t"), modules=[spec]) as engine:
        await engine.append(Record("x", 1))
        await engine.append(Record("x", 2))
        handle = engine.modules.get(Fragile)
        assert await handle.ask(lambda m: dict(m.counts)) == {"x": 2}
        assert handle.status.restarts == 1


# -- kind-counter: queries and index ---------------------------------------------------------
async def test_kind_counter_index_count_and_describe() -> None:
    spec = counter(index=True)
    async with open_ledger(LedgerConfig(ledger_id="t"), modules=[spec]) as engine:
        await engine.append_many([Record("a" if n % 3 else "b", n) for n in range(10)])
        handle = engine.modules.get(KindCounter)
        assert await handle.ask(KindCounter.count, "a") == 6
        assert await handle.ask(KindCounter.count, "zzz") == 0
        assert await handle.ask(KindCounter.seqs, "b") == [0, 3, 6, 9]
        assert await handle.ask(KindCounter.seqs, "b", 4, 1) == [6]
        info = await handle.ask(KindCounter.describe)
        assert info == {
            "total": 10,
            "kinds": {"a": 6, "b": 4},
            "distinct_kinds": 2,
            "indexed": True,
        }
    async with open_ledger(LedgerConfig(ledger_id="t"), modules=[counter()]) as engine:
        with pytest.raises(RuntimeError, match=r"keeps no index: set config 'index = true'"):
            await engine.modules.get(KindCounter).ask(KindCounter.seqs, "a")
    for bad, message in [
        ({"index": "yes"}, "config 'index' must be true or false, got 'yes'"),
        ({"state": ""}, "config 'state' must be a non-empty string (a path), got ''"),
        ({"snapshot_every": 0}, "config 'snapshot_every' must be an integer >= 1, got 0"),
    ]:
        with pytest.raises(ModuleError, match=r"kind-counter") as info:
            async with open_ledger(LedgerConfig(ledger_id="t"), modules=[counter(**bad)]):
                pass
        assert message in str(info.value.__cause__)


async def test_kind_counter_catches_up_when_its_inbox_overflows() -> None:
    spec = ModuleSpec(KindCounter, durable=True, inbox=1, config={"index": True})
    async with open_ledger(LedgerConfig(ledger_id="t"), modules=[spec]) as engine:
        await engine.append_many([Record("k", n) for n in range(50)])  # most not queued
        await engine.append(Record("k", 50))
        handle = engine.modules.get(KindCounter)
        counts = await handle.ask(lambda m: dict(m.counts))
        seqs = await handle.ask(KindCounter.seqs, "k")
        assert handle.status.lag == 0
    assert counts == {"k": 51}
    assert seqs == list(range(51))


# -- json-schema -----------------------------------------------------------------------------
ORDER_SCHEMA = {
    "type": "object",
    "required": ["customer", "items"],
    "properties": {
        "customer": {"type": "string", "minLength": 1},
        "items": {
            "type": "array",
            "items": {"type": "object", "properties": {"qty": {"type": "integer", "minimum": 1}}},
        },
    },
}


def schema_spec(**config: object) -> ModuleSpec[JsonSchemaValidator]:
    return ModuleSpec(JsonSchemaValidator, config=config)


async def test_json_schema_rejects_with_the_error_path() -> None:
    spec = schema_spec(schemas={"order.created": ORDER_SCHEMA, "order.*": {"type": "object"}})
    async with open_ledger(LedgerConfig(ledger_id="t"), modules=[spec]) as engine:
        await engine.append(Record("order.created", {"customer": "ada", "items": [{"qty": 2}]}))
        await engine.append(Record("order.paid", {}))  # the prefix schema
        await engine.append(Record("note", [1, 2]))  # no schema: allowed
        bad = Record("order.created", {"customer": "ada", "items": [{"qty": 2}, {"qty": 0}]})
        with pytest.raises(
            SchemaViolation, match=r"at \$\.payload\.items\[1\]\.qty: 0 is less"
        ) as e:
            await engine.append(bad)
        assert e.value.module_id == "json-schema"
        assert e.value.path == "$.payload.items[1].qty"
        assert e.value.schema_path == "#/properties/items/items/properties/qty/minimum"
        assert e.value.errors == 1
        with pytest.raises(SchemaViolation, match=r"'customer' is a required property") as e:
            await engine.append(Record("order.created", {"items": "none"}))
        assert e.value.errors == 2
        assert "(and 1 more)" in str(e.value)
        with pytest.raises(SchemaViolation, match=r"at \$\.payload: \[\] is not of type 'object'"):
            await engine.append(Record("order.shipped", []))
        info = await engine.modules.get(JsonSchemaValidator).ask(JsonSchemaValidator.describe)
        assert info == {"kinds": ["order.created", "order.*"], "checked": 5, "rejected": 3}
        assert engine.state.length == 3


async def test_json_schema_unknown_kinds_and_files(tmp_path: Path) -> None:
    schema_file = tmp_path / "note.json"
    schema_file.write_text(json.dumps({"type": "string", "format": "email"}))
    spec = schema_spec(schemas={"note": str(schema_file)}, unknown_kinds="reject")
    async with open_ledger(LedgerConfig(ledger_id="t"), modules=[spec]) as engine:
        await engine.append(Record("note", "ada@example.org"))
        with pytest.raises(SchemaViolation, match=r"is not a 'email'"):
            await engine.append(Record("note", "not an address"))
        with pytest.raises(RecordRejected, match=r"no schema for kind 'other'"):
            await engine.append(Record("other", 1))


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({}, "config 'schemas' must be a non-empty table of kind -> schema"),
        ({"schemas": {"a": 3}}, "must be a table (a JSON Schema) or the path of a JSON file"),
        ({"schemas": {"a": {"type": "nope"}}}, "is not a valid JSON Schema at #/type"),
        ({"schemas": {"a": "/nonexistent/s.json"}}, "cannot read /nonexistent/s.json"),
        ({"schemas": {"a": {}}, "unknown_kinds": "drop"}, "must be 'allow' or 'reject'"),
    ],
)
async def test_json_schema_bad_config_fails_startup(
    config: dict[str, object], message: str
) -> None:
    with pytest.raises(ModuleError, match=r"json-schema") as info:
        async with open_ledger(LedgerConfig(ledger_id="t"), modules=[schema_spec(**config)]):
            pass
    assert message in str(info.value.__cause__)


# -- jsonl-mirror ----------------------------------------------------------------------------
def mirror_spec(path: Path, **config: object) -> ModuleSpec[JsonlMirror]:
    return ModuleSpec(JsonlMirror, durable=True, config={"path": str(path), **config})


async def expected_lines(engine: LedgerEngine) -> bytes:
    header = export_header(engine.config.ledger_id, 0, genesis(engine.config.ledger_id))
    return header + b"".join([entry_line(e.record, e.hash) async for e in engine.read(0)])


async def test_jsonl_mirror_copies_every_entry_and_resumes(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "mirror.jsonl"
    storage = MemoryStorage()
    config = LedgerConfig(ledger_id="t")
    modules = [mirror_spec(path, fsync=True)]
    async with open_ledger(config, storage=storage, modules=modules) as engine:
        await engine.append_many([Record("k", {"n": n, "s": "é"}) for n in range(5)])
        handle = engine.modules.get(JsonlMirror)
        assert (await handle.ask(JsonlMirror.describe))["next_seq"] == 5
        # Terminated: it misses entries, then a restart copies them from the ledger.
        await engine.terminate("jsonl-mirror")
        await engine.append_many([Record("k", {"n": n}) for n in range(5, 8)])
        await engine.restart("jsonl-mirror")
        await engine.append(Record("k", {"n": 8}))
        await handle.ask(lambda m: None)  # every delivery before it is written
        assert path.read_bytes() == await expected_lines(engine)

    # A torn last line (a crash mid-write) is cut off and rewritten on the next start.
    data = path.read_bytes()
    path.write_bytes(data[:-7])
    lines_before = data.count(b"\n")
    engine = LedgerEngine(config, storage)
    engine.register(mirror_spec(path))
    async with engine:
        await engine.init_all()
        await engine.start_all()
        await engine.append(Record("k", {"n": 9}))
        await engine.modules.get(JsonlMirror).ask(lambda m: None)
        assert path.read_bytes() == await expected_lines(engine)
    assert path.read_bytes().count(b"\n") == lines_before + 1


async def test_jsonl_mirror_is_exactly_once_across_its_own_crash(tmp_path: Path) -> None:
    class Fragile(JsonlMirror):
        calls = 0

        async def after_append(self, record: Record, hash: Hash) -> None:
            await super().after_append(record, hash)
            Fragile.calls += 1
            if Fragile.calls == 2:
                raise RuntimeError("crash after writing")  # redelivered to the new incarnation

    path = tmp_path / "m.jsonl"
    spec = ModuleSpec(Fragile, durable=True, config={"path": str(path)})
    async with open_ledger(LedgerConfig(ledger_id="t"), modules=[spec]) as engine:
        for n in range(4):
            await engine.append(Record("k", n))
        handle = engine.modules.get(Fragile)
        await handle.ask(lambda m: None)
        assert handle.status.restarts == 1
        assert path.read_bytes() == await expected_lines(engine)


async def test_jsonl_mirror_refuses_a_file_of_another_ledger(tmp_path: Path) -> None:
    path = tmp_path / "m.jsonl"
    async with open_ledger(LedgerConfig(ledger_id="a"), modules=[mirror_spec(path)]) as engine:
        await engine.append_many([Record("k", n) for n in range(3)])
    for ledger, records, message in [
        ("b", 3, r"mirrors ledger 'a' from seq 0, not ledger 'b'"),  # the header says
        ("a", 3, r"does not match ledger 'a' at seq 2"),  # another ledger named "a"
        ("a", 1, r"ends at seq 2 but ledger 'a' has 1 entries"),
    ]:
        storage = MemoryStorage()
        async with open_ledger(LedgerConfig(ledger_id=ledger), storage=storage) as engine:
            await engine.append_many([Record("other", n) for n in range(records)])
        engine = LedgerEngine(LedgerConfig(ledger_id=ledger), storage)
        engine.register(mirror_spec(path))
        with pytest.raises(ModuleError, match=r"jsonl-mirror") as info:
            async with engine:
                await engine.init_all()
        assert re.search(message, str(info.value.__cause__)), info.value.__cause__
    path.write_text('{"no": "seq"}\n')
    async with LedgerEngine(LedgerConfig(ledger_id="a")) as engine:
        engine.register(mirror_spec(path))
        with pytest.raises(ModuleError, match=r"jsonl-mirror") as info:
            await engine.init_all()
    assert "does not start with an export header line" in str(info.value.__cause__)
    path.write_text('{"nucleus_export":1,"ledger_id":"a","from":0,"prev":"00"}\n{"no":1}\n')
    async with LedgerEngine(LedgerConfig(ledger_id="a")) as engine:
        engine.register(mirror_spec(path))
        with pytest.raises(ModuleError, match=r"jsonl-mirror") as info:
            await engine.init_all()
    assert "a Hash is 64 hex digits" in str(info.value.__cause__)


async def test_kind_counter_recounts_when_the_index_setting_changes(tmp_path: Path) -> None:
    state = str(tmp_path / "counts.db")
    storage = MemoryStorage()
    config = LedgerConfig(ledger_id="t")
    async with open_ledger(config, storage=storage, modules=[counter(state=state)]) as engine:
        await engine.append_many([Record("a" if n % 2 else "b", n) for n in range(6)])
    async with open_ledger(
        config, storage=storage, modules=[counter(state=state, index=True)]
    ) as engine:
        handle = engine.modules.get(KindCounter)
        assert await handle.ask(lambda m: dict(m.counts)) == {"a": 3, "b": 3}
        assert await handle.ask(KindCounter.seqs, "a") == [1, 3, 5]
        assert handle.status.processed == 6  # counted again, to build the index
    async with open_ledger(
        config, storage=storage, modules=[counter(state=state, index=True)]
    ) as engine:
        handle = engine.modules.get(KindCounter)
        assert await handle.ask(KindCounter.seqs, "b") == [0, 2, 4]
        assert handle.status.processed == 0  # the index came from the state file
