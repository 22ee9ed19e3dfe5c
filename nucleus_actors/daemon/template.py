"""The commented `nucleus.toml` that `nucleus init` writes (`nucleus run` accepts it as is)."""

from __future__ import annotations

from typing import Final

__all__ = ["CONFIG_TEMPLATE"]

CONFIG_TEMPLATE: Final = """\
# nucleus.toml: configuration of a nucleus_actors ledger daemon.
#
#   nucleus run nucleus.toml            # serve it (Ctrl-C or SIGTERM stops it cleanly)
#   nucleus verify main.db              # check the ledger file's hash chain
#
# Every key, its default and its meaning: docs/daemon.md. Unknown keys are errors.

# Where the HTTP/JSON API listens. Port 0 picks a free port (the log says which).
host = "127.0.0.1"
port = 8470

# When this environment variable is set (and not empty), every write needs the header
# "Authorization: Bearer <its value>". Reads are open: keep `host` on loopback or behind a
# proxy if that matters.
token_env = "NUCLEUS_TOKEN"

# Largest request body in bytes; larger bodies get 413 before they are parsed.
max_body_bytes = 4194304

# When a ledger fails (its modules keep crashing past max_restarts):
#   "exit"  stop the daemon with exit status 1 and let systemd / Kubernetes restart it;
#   "serve" keep serving the other ledgers; the failed one answers 503.
on_ledger_failure = "exit"

# Seconds in-flight requests get to finish on shutdown.
graceful_timeout = 10.0

# Logs (docs/operations.md): level and format ($NUCLEUS_LOG_LEVEL / $NUCLEUS_LOG_FORMAT and
# --log-level / --log-format override them), and one access line per HTTP request.
log_level = "info"
log_format = "text"
access_log = true

# Tokens may come from files instead (first line; re-read on SIGHUP):
# token_file = "token.txt"
# read_token_file = "read-token.txt"
# "token": reads need a token too (the read token, from $NUCLEUS_READ_TOKEN or
# read_token_file, or the API token). "open": anyone who can connect may read.
reads = "open"
read_token_env = "NUCLEUS_READ_TOKEN"

# HTTPS: set both (PEM files, relative to this file's directory).
# tls_cert = "cert.pem"
# tls_key = "key.pem"
# Host header values answered (DNS rebinding protection); others get 421. Bare names match
# any port; leave the key out to allow the bind address, localhost, 127.0.0.1 and [::1] on
# this port only; "*" answers any Host (only behind a proxy that checks it).
allowed_hosts = ["localhost", "127.0.0.1", "[::1]"]
# Limits against slow or greedy clients: seconds to send a request head and again its body,
# connections served at once (kept below `ulimit -n`), records per batch, and bytes of
# large bodies (over 64 KiB) processed at once.
read_timeout = 10.0
max_connections = 1000
max_batch_records = 1000
# /readyz answers 503 for a ledger whose appends have made no progress for this many seconds.
stall_timeout = 30.0
body_budget_bytes = 8388608

[[ledgers]]
# The ledger id: part of every API path (/v1/ledgers/main/...) and of the genesis hash.
id = "main"
# SQLite file, relative to this file's directory; ":memory:" keeps the ledger in RAM only.
storage = "main.db"
# "full": every acknowledged append survives a power loss. "normal": faster, but an OS crash
# or power loss may lose the last acknowledged appends.
durability = "full"
# Supervision, as in Erlang/OTP: which modules restart together when one crashes, and how
# many restarts within how many seconds fail the ledger.
strategy = "one_for_one"
max_restarts = 3
restart_window = 5.0
# Largest record, in bytes of its canonical JSON.
max_record_bytes = 1048576
# "tail": check the chain's end on open and the whole chain in the background; "full":
# verify the whole chain before serving.
verify_on_open = "tail"

# A validator: "order.*" records must carry a "customer" (else 409 Conflict).
[[ledgers.modules]]
use = "nucleus_actors.daemon.modules:RequireFields"
config = { kinds = ["order."], fields = ["customer"] }

# An index: counts records per kind, exactly once, logs the totals when it stops. It is a
# durable module: it is fed every entry in order, from storage when it falls behind. With
# `config = { state = "/path/counts.db" }` it keeps its counts with its position, so that a
# restart reads only what it had not counted yet (without it, it counts the ledger again on
# every start). The supervision options are shown with their defaults.
[[ledgers.modules]]
use = "nucleus_actors.daemon.modules:KindCounter"
restart = "permanent"   # or "transient", "temporary"
shutdown = 5.0          # seconds stop() may take; inf waits forever
timeout = 30.0          # seconds each callback may take; inf = no limit
inbox = 64              # after_append deliveries queued before it lags
overflow = "catch_up"   # durable modules: "catch_up" (lag, read back later) or "block"
"""
