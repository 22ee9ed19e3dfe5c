"""Fault injection for nucleus_actors modules: plans, probes, invariant checks, pytest plugin.

```python
from nucleus_actors.testing import FaultPlan, open_tracked_ledger

plan = FaultPlan().crash("after_append", nth=3)
async with open_tracked_ledger(modules=[plan.wrap(MyModule)]) as ledger:
    for n in range(5):
        await ledger.append(Record("tick", {"n": n}))
assert plan.seen("my-module") == [0, 1, 2, 3, 4]
```

* `FaultPlan` / `Fault`: crash, hang, delay or reject a module's callbacks on cue; `wrap` keeps
  the module's id, version and type.
* `FaultSchedule`: seeded random plans (same seed, same faults) for chaos tests.
* `Probe` / `GatingProbe`: modules that record every callback (`CallbackLog`).
* `TrackedLedger` / `open_tracked_ledger`: a ledger that records every append and checks the
  runtime's invariants (`check()`, `InvariantViolation`).
* `StorageConformance` / `make_entries`: the storage contract as a reusable pytest suite for
  any storage backend (docs/storage.md, "Writing a backend").
* `nucleus_actors.testing.pytest_plugin`: fixtures (`nucleus_ledger`, `nucleus_seed`,
  `nucleus_schedule`, `nucleus_probe`, `nucleus_clock`) and `--nucleus-seed`; installed as a
  pytest plugin with the package.

Guide: docs/testing.md.
"""

from ._events import Callback, CallbackEvent, CallbackLog, CallOutcome
from ._faults import Action, Fault, FaultPlan, InjectedFault
from ._probe import GatingProbe, Probe
from ._schedule import FaultSchedule
from ._storage import StorageConformance, make_entries
from ._tracked import (
    TAG_KEY,
    AppendCall,
    CheckReport,
    InvariantViolation,
    StopReport,
    TrackedLedger,
    open_tracked_ledger,
)

__all__ = [
    # fault plans
    "FaultPlan",
    "Fault",
    "Action",
    "Callback",
    "InjectedFault",
    "FaultSchedule",
    # recording
    "Probe",
    "GatingProbe",
    "CallbackLog",
    "CallbackEvent",
    "CallOutcome",
    # invariants
    "TrackedLedger",
    "open_tracked_ledger",
    "AppendCall",
    "CheckReport",
    "StopReport",
    "InvariantViolation",
    "TAG_KEY",
    # storage backends
    "StorageConformance",
    "make_entries",
]

# Public names show where users import them from (as trio does), not the private module;
# names of the core re-exported here (`CallOutcome` is `nucleus_actors.CallbackOutcome`) keep
# theirs.
for _name in __all__:
    _obj = globals()[_name]
    if (isinstance(_obj, type) or callable(_obj)) and _obj.__module__.startswith(__name__ + "."):
        _obj.__module__ = __name__
del _name, _obj
