"""One writer per ledger file whatever its name (issue 15 §1), read-only files refused at open,
and `verify_file` on a read-only mount.

The sidecar `<path>.lock` is keyed on the path string: a second writer opening the same file
through a hard link, a symlink or a bind mount takes another sidecar. `SQLiteStorage` also
flocks the database file itself (its inode), so every alias conflicts. Real clock, real
processes.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from nucleus_actors import LedgerConfig, Receipt, Record, StorageError, open_ledger
from nucleus_actors.storage import SQLiteStorage, verify_file

SECOND_WRITER = textwrap.dedent(
    """
    import sys, trio
    from nucleus_actors import LedgerConfig, Record, StorageError, open_ledger
    from nucleus_actors.storage import SQLiteStorage

    async def main(path):
        try:
            async with open_ledger(
                LedgerConfig(ledger_id="orders"), storage=SQLiteStorage(path)
            ) as ledger:
                for n in range(50):
                    receipt = await ledger.append(Record("second", {"n": n}))
                    print("appended", receipt.seq, flush=True)
        except StorageError as exc:
            print("refused:", exc, flush=True)

    trio.run(main, sys.argv[1])
    """
)


def _second_writer(path: Path) -> str:
    out = subprocess.run(
        [sys.executable, "-c", SECOND_WRITER, str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return out.stdout


def _alias(kind: str, path: Path) -> Path:
    alias = path.with_name(f"{kind}-alias.db")
    if kind == "hardlink":
        os.link(path, alias)
    else:
        alias.symlink_to(path)
    return alias


async def _append(ledger: object, n: int, tag: str) -> list[Receipt]:
    receipts = []
    for i in range(n):
        receipts.append(await ledger.append(Record(tag, {"n": i})))  # type: ignore[attr-defined]
    return receipts


async def _check_nothing_lost(path: Path, receipts: list[Receipt]) -> None:
    length, head = await verify_file(path)
    assert length == len(receipts)
    assert head == receipts[-1].hash
    async with open_ledger(LedgerConfig(ledger_id="orders"), storage=SQLiteStorage(path)) as led:
        for receipt in receipts:
            entry = await led.get(receipt.seq)
            assert (entry.hash, entry.record.kind) == (receipt.hash, "first")


@pytest.mark.parametrize("kind", ["hardlink", "symlink"])
async def test_a_second_writer_in_another_process_through_an_alias_is_refused(
    kind: str, tmp_path: Path
) -> None:
    path = tmp_path / "ledger.db"
    async with open_ledger(LedgerConfig(ledger_id="orders"), storage=SQLiteStorage(path)) as led:
        receipts = await _append(led, 50, "first")
        alias = _alias(kind, path)
        out = await trio.to_thread.run_sync(_second_writer, alias)
        assert out.startswith(
            f"refused: ledger file {alias} is already open for writing by another process, "
            "through this name or another one for the same file (a hard link, a symlink or a "
            "bind mount: the database file itself is locked)"
        ), out
        assert "appended" not in out
        receipts += await _append(led, 50, "first")  # the first writer is unharmed
        await led.verify()
    await _check_nothing_lost(path, receipts)
    # Once the first writer closed, the alias opens (the locks went with it).
    out = await trio.to_thread.run_sync(_second_writer, alias)
    assert out.count("appended") == 50, out


@pytest.mark.parametrize("kind", ["hardlink", "symlink"])
async def test_a_second_writer_in_this_process_through_an_alias_is_refused(
    kind: str, tmp_path: Path
) -> None:
    path = tmp_path / "ledger.db"
    first = SQLiteStorage(path)
    await first.open("orders")
    alias = _alias(kind, path)
    second = SQLiteStorage(alias)
    with pytest.raises(
        StorageError,
        match=rf"ledger file {alias} is already open for writing in this process as {path} "
        r"\(the same file under another name\)",
    ):
        await second.open("orders")
    assert not second.lock_path.exists() or second._conn is None
    await first.close()
    await second.open("orders")  # released by close
    await second.close()


async def test_the_same_path_twice_is_refused_by_the_sidecar_first(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    first = SQLiteStorage(path)
    await first.open("orders")
    with pytest.raises(StorageError, match=r"its lock .*\.lock is held by another SQLiteStorage"):
        await SQLiteStorage(path).open("orders")
    await first.close()


def _posix_locks(path: Path) -> list[str]:
    """This process's POSIX (fcntl) locks on `path`'s inode, from /proc/locks."""
    inode = f":{os.stat(path).st_ino} "
    return sorted(
        " ".join(line.split()[1:4] + line.split()[6:])
        for line in Path("/proc/locks").read_text().splitlines()
        if inode in line and "POSIX" in line and f" {os.getpid()} " in line
    )


async def test_a_refused_alias_keeps_this_processs_sqlite_locks(tmp_path: Path) -> None:
    """Closing any descriptor of a file drops the process's POSIX locks on it, and SQLite's
    locks are POSIX locks: a refused open must not open-and-close the database file while the
    first writer's SQLite connections hold it."""
    path = tmp_path / "ledger.db"
    async with open_ledger(LedgerConfig(ledger_id="orders"), storage=SQLiteStorage(path)) as led:
        receipts = await _append(led, 5, "first")
        held = _posix_locks(path)
        assert held  # SQLite's shared lock on the database file
        alias = _alias("hardlink", path)
        for _ in range(3):
            with pytest.raises(StorageError, match=r"already open for writing in this process"):
                await SQLiteStorage(alias).open("orders")
            assert _posix_locks(path) == held
        receipts += await _append(led, 5, "first")
    await _check_nothing_lost(path, receipts)


HOLDER = textwrap.dedent(
    """
    import sys, trio
    from nucleus_actors.storage import SQLiteStorage

    async def main(path):
        storage = SQLiteStorage(path)
        await storage.open("orders")
        print("open", flush=True)
        await trio.to_thread.run_sync(sys.stdin.read)
        await storage.close()

    trio.run(main, sys.argv[1])
    """
)


@pytest.fixture
def held(tmp_path: Path) -> Iterator[Path]:
    """A ledger file (3 entries) held open for writing by another process."""
    path = tmp_path / "ledger.db"
    trio.run(_fill, path)
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdin is not None
    assert holder.stdout is not None
    try:
        assert holder.stdout.readline() == "open\n"
        yield path
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
        holder.stdout.close()


async def test_a_refused_open_keeps_the_locks_of_a_verify_file_in_progress(held: Path) -> None:
    """Another process writes the ledger; this one runs verify_file (SQLite holds the file) and,
    meanwhile, tries to open it for writing: refused, and verify_file's locks stay."""
    alias = _alias("hardlink", held)  # past the sidecar lock, to the inode's
    seen: list[tuple[list[str], list[str]]] = []

    def progress(done: int, total: int) -> None:
        before = _posix_locks(held)
        with pytest.raises(StorageError, match=r"already open for writing by another process"):
            SQLiteStorage(alias)._open_sync("orders")  # the same steps as open(), in-line
        seen.append((before, _posix_locks(held)))

    assert (await verify_file(held, progress=progress))[0] == 3
    assert seen
    for before, after in seen:
        assert before  # verify_file's SQLite holds a lock on the file
        assert after == before


# -- read-only files ---------------------------------------------------------------------------


@pytest.fixture
def immutable(tmp_path: Path) -> Iterator[Path]:
    """A ledger file with the immutable attribute (`chattr +i`), removed afterwards."""
    path = tmp_path / "ledger.db"
    trio.run(_fill, path)
    if shutil.which("chattr") is None:
        pytest.skip("no chattr")
    done = subprocess.run(["chattr", "+i", str(path)], capture_output=True)
    if done.returncode:
        pytest.skip(f"chattr +i is not allowed here: {done.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["chattr", "-i", str(path)], check=True)


async def _fill(path: Path) -> None:
    async with open_ledger(LedgerConfig(ledger_id="orders"), storage=SQLiteStorage(path)) as led:
        await _append(led, 3, "first")


def test_an_immutable_ledger_file_refuses_to_open(immutable: Path) -> None:
    async def main() -> None:
        with pytest.raises(
            StorageError,
            match=rf"ledger file {immutable} is read-only \(Operation not permitted\): a "
            r"writer must be able to write it .*use verify_file / `nucleus verify`",
        ):
            await SQLiteStorage(immutable).open("orders")
        # nothing held: verify_file reads it, and so does a later writer once writable
        assert (await verify_file(immutable))[0] == 3

    trio.run(main)


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores file permissions")
async def test_a_ledger_file_without_write_permission_refuses_to_open(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    await _fill(path)
    path.chmod(0o444)
    with pytest.raises(StorageError, match=r"is read-only \(Permission denied\)"):
        await SQLiteStorage(path).open("orders")


def _can_mount() -> bool:
    if shutil.which("unshare") is None or shutil.which("mount") is None:
        return False
    done = subprocess.run(
        ["unshare", "-m", "sh", "-c", "mount --bind / /mnt && umount /mnt"], capture_output=True
    )
    return done.returncode == 0


@pytest.mark.skipif(not _can_mount(), reason="needs unshare -m and mount (CAP_SYS_ADMIN)")
async def test_a_second_writer_through_a_bind_mount_is_refused(tmp_path: Path) -> None:
    data = tmp_path / "data"
    other = tmp_path / "other"
    data.mkdir()
    other.mkdir()
    path = data / "ledger.db"
    async with open_ledger(LedgerConfig(ledger_id="orders"), storage=SQLiteStorage(path)) as led:
        receipts = await _append(led, 20, "first")
        # The database file bind-mounted onto another path (a bind mount of the directory
        # would share the sidecar lock too): only the lock on the file itself sees the alias.
        alias = other / "ledger.db"
        alias.touch()
        script = f"mount --bind {path} {alias} && {sys.executable} -c '{SECOND_WRITER}' {alias}"
        done = await trio.to_thread.run_sync(
            lambda: subprocess.run(
                ["unshare", "-m", "sh", "-c", script], capture_output=True, text=True, timeout=120
            )
        )
        assert done.stdout.startswith(
            f"refused: ledger file {alias} is already open for writing by another process"
        ), done.stdout + done.stderr
        receipts += await _append(led, 20, "first")
    await _check_nothing_lost(path, receipts)


@pytest.mark.skipif(not _can_mount(), reason="needs unshare -m and mount (CAP_SYS_ADMIN)")
@pytest.mark.parametrize("how", ["verify_file", "nucleus verify"])
def test_verify_works_on_a_read_only_mount(how: str, tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    path = data / "ledger.db"
    trio.run(_fill, path)
    assert not path.with_name("ledger.db-wal").exists()  # closed cleanly: WAL merged
    if how == "verify_file":
        command = (
            f"{sys.executable} -c 'import trio; from nucleus_actors.storage import verify_file; "
            f'print(trio.run(verify_file, "{path}")[0])\''
        )
    else:
        nucleus = Path(sys.executable).with_name("nucleus")
        command = f"{nucleus} verify {path}"
    script = (
        f"mount --bind {data} {data} && mount -o remount,ro,bind {data} && "
        f"touch {data}/probe 2>/dev/null && echo WRITABLE; {command}"
    )
    done = subprocess.run(
        ["unshare", "-m", "sh", "-c", script], capture_output=True, text=True, timeout=120
    )
    assert "WRITABLE" not in done.stdout  # the mount really is read-only
    assert done.returncode == 0, done.stdout + done.stderr
    if how == "verify_file":
        assert done.stdout.strip() == "3"
    else:
        assert "3 entries" in done.stdout + done.stderr, done.stdout + done.stderr
