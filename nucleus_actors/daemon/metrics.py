"""`/metrics`: Prometheus metrics of a daemon, from its own `CollectorRegistry`.

Ledger and module figures are read at scrape time from `engine.statistics()`,
`engine.state` and `engine.modules.status()` (nothing is counted twice, nothing drifts). Hook
latency is read from the runtime's instrumentation seam: an `Instrument` attached to every
module the daemon builds observes the duration of each `before_append` / `after_append` call
(the runtime only runs, hence only reports, the hooks a module's class overrides).
docs/metrics.md lists every metric.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Final

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

from .. import __version__
from .._instrument import CallbackCall, CallbackResult, Instrument, attach_instrument
from ..lifecycle import ModuleState, Phase
from ..module import Module

if TYPE_CHECKING:
    from .host import LedgerHost

__all__ = ["HOOK_BUCKETS", "METRICS", "DaemonMetrics", "HookTimer"]

log = logging.getLogger("nucleus_actors.daemon")

HOOK_BUCKETS: Final = (
    0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025,
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip
"""Histogram buckets of hook latency, in seconds (10 µs .. 30 s, then +Inf)."""

METRICS: Final[Mapping[str, tuple[str, str, tuple[str, ...]]]] = {
    "nucleus_daemon_info": ("gauge", "Always 1; the version label says which.", ("version",)),
    "nucleus_ledger_up": (
        "gauge",
        "1 while the ledger serves reads and writes, else 0.",
        ("ledger",),
    ),
    "nucleus_ledger_phase": (
        "gauge",
        "1 for the ledger's current lifecycle phase, 0 for the others.",
        ("ledger", "phase"),
    ),
    "nucleus_ledger_entries": ("gauge", "Entries in the ledger (its length).", ("ledger",)),
    "nucleus_ledger_verified_entries": (
        "gauge",
        "Entries covered by the last completed full chain verification (0 before one).",
        ("ledger",),
    ),
    "nucleus_ledger_verify_failed": (
        "gauge",
        "1 when the last full chain verification found an entry that does not verify.",
        ("ledger",),
    ),
    "nucleus_ledger_writer": (
        "gauge",
        "1 while this daemon writes the ledger (SQLite, memory, or PostgreSQL lease holder); "
        "0 on a PostgreSQL standby or while down.",
        ("ledger",),
    ),
    "nucleus_ledger_epoch": (
        "gauge",
        "PostgreSQL ledgers: the lease epoch this daemon writes under or last saw (0 for "
        "SQLite and memory ledgers).",
        ("ledger",),
    ),
    "nucleus_ledger_takeovers_total": (
        "counter",
        "PostgreSQL ledgers: times this daemon took the ledger over (a new epoch).",
        ("ledger",),
    ),
    "nucleus_ledger_fenced_total": (
        "counter",
        "PostgreSQL ledgers: times this daemon's writer was fenced (a write refused because "
        "another daemon holds a newer epoch).",
        ("ledger",),
    ),
    "nucleus_ledger_appends_total": (
        "counter",
        "Records committed since the daemon opened the ledger.",
        ("ledger",),
    ),
    "nucleus_ledger_rejects_total": (
        "counter",
        "Records vetoed by a module's before_append.",
        ("ledger",),
    ),
    "nucleus_ledger_crashes_total": (
        "counter",
        "Module crashes in the ledger (a failed restart counts as one).",
        ("ledger",),
    ),
    "nucleus_ledger_restarts_total": (
        "counter",
        "Module restarts in the ledger (group and manual restarts included).",
        ("ledger",),
    ),
    "nucleus_module_state": (
        "gauge",
        "1 for the module's current state, 0 for the others.",
        ("ledger", "module", "state"),
    ),
    "nucleus_module_restarts_total": (
        "counter",
        "Times the module was restarted.",
        ("ledger", "module"),
    ),
    "nucleus_module_crashes_total": (
        "counter",
        "Times the module crashed.",
        ("ledger", "module"),
    ),
    "nucleus_module_inbox_depth": (
        "gauge",
        "after_append deliveries queued or being processed.",
        ("ledger", "module"),
    ),
    "nucleus_module_processed_total": (
        "counter",
        "after_append deliveries processed.",
        ("ledger", "module"),
    ),
    "nucleus_module_dropped_total": (
        "counter",
        "after_append deliveries dropped by the module's overflow policy.",
        ("ledger", "module"),
    ),
    "nucleus_module_lag": (
        "gauge",
        "Committed entries the module has not processed yet (durable: head - cursor).",
        ("ledger", "module"),
    ),
    "nucleus_module_stalls_total": (
        "counter",
        "Times a callback of the module blocked the event loop longer than stall_warning.",
        ("ledger", "module"),
    ),
    "nucleus_module_worker_pid": (
        "gauge",
        "Process id of the module's worker (isolation = process); 0 for a task module.",
        ("ledger", "module"),
    ),
    "nucleus_module_incarnation": (
        "gauge",
        "1 for the module's first run, +1 per restart.",
        ("ledger", "module"),
    ),
    "nucleus_module_hook_duration_seconds": (
        "histogram",
        "Time spent in each before_append / after_append call of a module.",
        ("ledger", "module", "hook"),
    ),
}
"""Every metric the daemon serves: name -> (type, help, labels). docs/metrics.md matches."""

_HOOKS: Final = ("before_append", "after_append")


def _family(name: str) -> CounterMetricFamily | GaugeMetricFamily:
    kind, help_text, labels = METRICS[name]
    if kind == "counter":
        return CounterMetricFamily(name.removesuffix("_total"), help_text, labels=labels)
    return GaugeMetricFamily(name, help_text, labels=labels)


class _LedgerCollector(Collector):
    """Reads every ledger's statistics and module statuses at scrape time."""

    def __init__(self, hosts: Callable[[], Iterable[LedgerHost]]) -> None:
        self._hosts = hosts

    def collect(self) -> Iterator[Metric]:
        f = {name: _family(name) for name, (kind, _, _) in METRICS.items() if kind != "histogram"}
        f["nucleus_daemon_info"].add_metric([__version__], 1)
        for host in self._hosts():
            ledger = host.id
            engine = host.engine
            state = engine.state
            stats = engine.statistics()
            f["nucleus_ledger_up"].add_metric([ledger], 1 if host.serving else 0)
            for phase in Phase:
                f["nucleus_ledger_phase"].add_metric(
                    [ledger, phase.value], 1 if phase is state.phase else 0
                )
            f["nucleus_ledger_entries"].add_metric([ledger], state.length)
            f["nucleus_ledger_verified_entries"].add_metric([ledger], host.verified_entries)
            f["nucleus_ledger_verify_failed"].add_metric([ledger], int(host.verify_failed))
            f["nucleus_ledger_writer"].add_metric(
                [ledger], 1 if host.serving and host.role != "standby" else 0
            )
            f["nucleus_ledger_epoch"].add_metric([ledger], host.epoch or 0)
            f["nucleus_ledger_takeovers_total"].add_metric([ledger], host.takeovers)
            f["nucleus_ledger_fenced_total"].add_metric([ledger], host.fenced)
            f["nucleus_ledger_appends_total"].add_metric([ledger], stats.appends)
            f["nucleus_ledger_rejects_total"].add_metric([ledger], stats.rejects)
            f["nucleus_ledger_crashes_total"].add_metric([ledger], stats.crashes)
            f["nucleus_ledger_restarts_total"].add_metric([ledger], stats.restarts)
            for status in engine.modules.status():
                labels = [ledger, status.id]
                for module_state in ModuleState:
                    f["nucleus_module_state"].add_metric(
                        [*labels, module_state.value], 1 if module_state is status.state else 0
                    )
                f["nucleus_module_restarts_total"].add_metric(labels, status.restarts)
                f["nucleus_module_crashes_total"].add_metric(labels, status.crashes)
                f["nucleus_module_inbox_depth"].add_metric(labels, status.inbox_depth)
                f["nucleus_module_processed_total"].add_metric(labels, status.processed)
                f["nucleus_module_dropped_total"].add_metric(labels, status.dropped)
                f["nucleus_module_incarnation"].add_metric(labels, status.incarnation)
                f["nucleus_module_lag"].add_metric(labels, status.lag)
                f["nucleus_module_stalls_total"].add_metric(labels, status.stalls)
                f["nucleus_module_worker_pid"].add_metric(labels, status.pid or 0)
        yield from f.values()


class DaemonMetrics:
    """The metrics of one daemon: its own `CollectorRegistry` (never the global one), the
    hook latency histogram, and a collector over its ledgers (`watch`)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        """The registry `/metrics` renders."""
        name = "nucleus_module_hook_duration_seconds"
        self.hook_seconds = Histogram(
            name,
            METRICS[name][1],
            labelnames=METRICS[name][2],
            buckets=HOOK_BUCKETS,
            registry=self.registry,
        )
        """Hook latency, labelled by ledger, module and hook."""
        self._watching = False

    def watch(self, hosts: Callable[[], Iterable[LedgerHost]]) -> None:
        """Serve the figures of the ledgers `hosts()` returns at each scrape (once only).

        Raises:
            RuntimeError: called twice.
        """
        if self._watching:
            raise RuntimeError("DaemonMetrics.watch was already called")
        self._watching = True
        self.registry.register(_LedgerCollector(hosts))

    def instrument(self, ledger: str) -> Callable[[Module], None]:
        """A function that times the hooks of a module instance of `ledger`.

        It attaches a `HookTimer` to the instance (the instrumentation seam): nothing about the
        module changes, and only the hooks the runtime runs are timed.
        """
        timer = HookTimer(self.hook_seconds, ledger)

        def wrap(module: Module) -> None:
            attach_instrument(module, timer)

        return wrap

    def render(self, accept: str | None) -> tuple[bytes, str]:
        """The exposition for a scrape with this `Accept` header: `(body, content type)`
        (OpenMetrics when the scraper asks for it, else the Prometheus text format)."""
        try:
            encoder, content_type = choose_encoder(accept or "")
            return encoder(self.registry), content_type
        except (TypeError, ValueError):  # e.g. `version=abc`: not a version it can compare
            encoder, content_type = choose_encoder("")
            return encoder(self.registry), content_type


class HookTimer(Instrument):
    """Observes each before_append / after_append call's duration into the histogram."""

    def __init__(self, histogram: Histogram, ledger: str) -> None:
        self._histogram = histogram
        self._ledger = ledger
        self._observers: dict[tuple[str, str], Callable[[float], None]] = {}

    def after_callback(self, call: CallbackCall, result: CallbackResult) -> None:
        if call.callback not in _HOOKS:
            return
        key = (call.module_id, call.callback)
        observe = self._observers.get(key)
        if observe is None:
            labelled = self._histogram.labels(self._ledger, call.module_id, call.callback)
            observe = self._observers[key] = labelled.observe
        observe(result.duration)
