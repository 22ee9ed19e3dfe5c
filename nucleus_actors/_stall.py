"""The stall detector: a watchdog thread that notices a TASK module blocking the event loop.

A module callback that calls `time.sleep`, a blocking library or CPU-bound code holds up every
task of the trio loop: appends, other modules, its own `timeout` (which cannot fire while the
loop is blocked). Nothing inside the loop can see that, so a thread watches from outside:

* **Heartbeat.** Every `interval` (a quarter of `stall_warning`) the thread posts a tiny
  callback into the loop with `TrioToken.run_sync_soon`; the loop runs it within one scheduling
  round when it is healthy. A beat still pending after `stall_warning` means the loop has been
  stuck that long.
* **Who.** Each actor publishes, with plain attribute writes, the frame of its incarnation's
  task (`Child.run_frame`, once per incarnation) and the callback it is in (`Child.step`, at
  entry and exit of each callback). While the beat is pending the thread reads the loop
  thread's stack (`sys._current_frames()`): the actor frame on it names the module, and the
  frame that one of the actor's call sites called is the blocking module call (runtime work
  in the actor, e.g. decoding a catch-up chunk, is not a module's stall).
* **Once per stall.** The same call (the same frame object) must be on the stack for at least
  half of `stall_warning` and the loop stuck for `stall_warning`; each blocking call is counted
  once (`ModuleStatus.stalls`) and logged once, as a WARNING naming the module, the callback
  and the fix (`isolation=PROCESS`).

No per-step instrument and no trio task: the loop pays two attribute writes per callback and
one tiny callback per `interval`. The thread is a daemon thread owned by the engine: it starts
when the ledger opens and is joined when it closes.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Iterable
from types import FrameType
from typing import TYPE_CHECKING

import trio

if TYPE_CHECKING:
    from .module._actor import Child

__all__ = ["StallWatchdog"]

log = logging.getLogger("nucleus_actors.supervisor")

_HERE = os.path.dirname(os.path.abspath(__file__))
_RUNTIME_FILES = frozenset(
    os.path.join(_HERE, *parts)
    for parts in (("module", "_actor.py"), ("_instrument.py",), ("module", "_mailbox.py"))
)
"""Files of the runtime's own frames between an actor and the module's callback."""

DOCS_HINT = "docs/supervision.md#stalls"

_SITES: frozenset[object] = frozenset()


def _call_sites() -> frozenset[object]:
    """Code objects of the runtime functions that call a module's callback (cached)."""
    global _SITES
    if not _SITES:
        from . import _instrument
        from .module._actor import Child

        methods = ("_callback", "_stop_callback", "_position", "_durable_one", "_deliveries",
                   "_before", "_ask")  # fmt: skip
        _SITES = frozenset(
            [getattr(Child, name).__code__ for name in methods] + [_instrument.run.__code__]
        )
    return _SITES


class StallWatchdog:
    """Watch one ledger's TASK modules from a thread; see the module docstring.

    Args:
        ledger_id: for the warning.
        limit: `LedgerConfig.stall_warning`, seconds.
        children: returns the ledger's modules (called from the watchdog thread).
    """

    def __init__(
        self, ledger_id: str, limit: float, children: Callable[[], Iterable[Child]]
    ) -> None:
        self.ledger_id = ledger_id
        self.limit = limit
        self.interval = min(max(limit / 4, 0.002), 0.25)
        self._children = children
        self._token: trio.lowlevel.TrioToken | None = None
        self._loop_thread = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._posted = 0  # beats posted (written by the watchdog thread only)
        self._seen = 0  # the last beat the loop ran (written by the loop only)

    @property
    def running(self) -> bool:
        """Whether the watchdog thread is alive."""
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        """Start the thread; call from the trio loop it watches (it takes its token)."""
        assert self._thread is None, "a StallWatchdog starts once"
        self._token = trio.lowlevel.current_trio_token()
        self._loop_thread = threading.get_ident()
        self._thread = threading.Thread(
            target=self._watch, name=f"nucleus stall watchdog {self.ledger_id}", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        """Stop the thread and wait for it (a few milliseconds at most: it only sleeps on an
        event). Idempotent."""
        self._stop.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()

    # -- the watchdog thread ------------------------------------------------------------------
    def _beat(self, n: int) -> None:
        self._seen = n

    def _watch(self) -> None:
        token = self._token
        assert token is not None
        posted_at = 0.0
        frame_seen: FrameType | None = None  # the blocking call found by the last sample
        seen_since = 0.0
        reported: FrameType | None = None  # the call already counted in this stuck period
        while not self._stop.wait(self.interval):
            now = time.monotonic()
            if self._seen == self._posted:  # the loop ran the last beat: it is responsive
                frame_seen = reported = None
                self._posted += 1
                posted_at = now
                try:
                    token.run_sync_soon(self._beat, self._posted)
                except trio.RunFinishedError:  # pragma: no cover - the engine stops us first
                    return
                continue
            found = self._blocker()
            if found is None:
                frame_seen = None
                continue
            child, step, frame = found
            if frame is not frame_seen:
                frame_seen, seen_since = frame, now
                continue
            if (
                frame is not reported
                and now - posted_at >= self.limit
                and now - seen_since >= self.limit / 2
            ):
                reported = frame
                self._report(child, step, now - min(posted_at, seen_since))

    def _blocker(self) -> tuple[Child, str, FrameType] | None:
        """The module call running on the loop thread now: (child, callback, its frame).

        Walking out from the innermost frame: the module's frame is the one a call site of the
        actor (`_call_sites`) called, unless that is runtime code itself; the actor's task
        frame further out names the module. Runtime work inside an actor that is not a module
        call (reading a catch-up chunk from storage, decoding it) is never blamed on it.
        """
        try:
            actors = {id(c.run_frame): c for c in list(self._children()) if c.run_frame}
        except RuntimeError:  # the registry changed while we looked: try at the next tick
            return None
        if not actors:
            return None
        sites = _call_sites()
        frame = sys._current_frames().get(self._loop_thread)
        inward: FrameType | None = None  # the frame visited just before (called by `frame`)
        called: FrameType | None = None  # the module's frame, once found
        while frame is not None:
            child = actors.get(id(frame))
            if child is not None and frame is child.run_frame:
                step = child.step
                if called is None or not step:  # blocked in the runtime, not in a callback
                    return None
                return child, step, called
            if (
                called is None
                and frame.f_code in sites
                and inward is not None
                and inward.f_code.co_filename not in _RUNTIME_FILES
            ):
                called = inward
            inward = frame
            frame = frame.f_back
        return None

    def _report(self, child: Child, step: str, stuck: float) -> None:
        child.stalls += 1  # written only by this thread; read by the loop (an int: atomic)
        log.warning(
            "module %r of ledger %r blocked the event loop in %s for over %.3g s "
            "(stall_warning=%s s; seen %.3g s so far): every append and module waits meanwhile. "
            "Blocking calls or CPU-bound work in a TASK module stall the whole ledger; run it "
            "with isolation=PROCESS (see %s) or make the call async.",
            child.id,
            self.ledger_id,
            step,
            self.limit,
            self.limit,
            stuck,
            DOCS_HINT,
        )
