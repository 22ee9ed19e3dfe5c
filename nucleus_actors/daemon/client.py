"""`DaemonClient`: a small synchronous client of the daemon's HTTP API (what the `nucleus`
client commands use: `status`, `append`, `tail`, `export`).

Every failure is a `ClientError` with a message for humans and the exit status the CLI uses:

```
ClientError (NucleusError)            exit 1: the daemon refused or failed the request
├── DaemonUnreachable (ConnectionError) exit 3: nothing answers at the URL, or not a daemon
└── ApiError                           exit 1, or 2 for bad input (400/404/413/415/422)
    └── Unauthorized                   exit 4: a write without the right token (401)
```
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Final

import httpx

from ..errors import NucleusError
from .problems import PROBLEM_TYPE_PREFIX

__all__ = [
    "DEFAULT_URL",
    "EXIT_BAD_INPUT",
    "EXIT_REFUSED",
    "EXIT_UNAUTHORIZED",
    "EXIT_UNREACHABLE",
    "ApiError",
    "ClientError",
    "DaemonClient",
    "DaemonUnreachable",
    "Unauthorized",
]

DEFAULT_URL: Final = "http://127.0.0.1:8470"
"""Where the client commands look for the daemon unless `--url` / `$NUCLEUS_URL` says."""

EXIT_REFUSED: Final = 1
"""The daemon refused or failed the request (a veto, a failed module or ledger, a 5xx)."""
EXIT_BAD_INPUT: Final = 2
"""The request itself is wrong (bad JSON, invalid record, unknown ledger, bad option)."""
EXIT_UNREACHABLE: Final = 3
"""No daemon answers at the URL (refused, timed out, not HTTP, not a nucleus daemon)."""
EXIT_UNAUTHORIZED: Final = 4
"""The daemon wants a token for writes and did not get the right one."""

_BAD_INPUT_STATUSES: Final = frozenset({400, 404, 405, 413, 415, 422})
_READ_TIMEOUT: Final = 30.0
_STREAM_READ_TIMEOUT: Final = 45.0  # > the daemon's 15 s keep-alive: silence means a dead link


class ClientError(NucleusError):
    """A client command could not do its job; `exit_code` is the `nucleus` exit status."""

    exit_code: int = EXIT_REFUSED


class DaemonUnreachable(ClientError, ConnectionError):
    """Nothing (or something that is not a nucleus daemon) answers at the URL."""

    exit_code = EXIT_UNREACHABLE


class ApiError(ClientError):
    """The daemon answered with an error (an RFC 9457 problem).

    Attributes:
        status: the HTTP status.
        slug: the problem type's slug (`record-rejected`, `unknown-ledger`, ...), or "".
        detail: the problem's detail (or the body, if it is not a problem).
        problem: the whole problem object ({} if the body is not one).
    """

    def __init__(self, message: str, *, status: int, problem: Mapping[str, Any]) -> None:
        super().__init__(message)
        self.status = status
        self.problem = dict(problem)
        kind = str(self.problem.get("type", ""))
        self.slug = (
            kind.removeprefix(PROBLEM_TYPE_PREFIX) if kind.startswith(PROBLEM_TYPE_PREFIX) else ""
        )
        self.detail = str(self.problem.get("detail", message))
        if status == 401:
            self.exit_code = EXIT_UNAUTHORIZED
        elif status in _BAD_INPUT_STATUSES:
            self.exit_code = EXIT_BAD_INPUT
        else:
            self.exit_code = EXIT_REFUSED


class Unauthorized(ApiError):
    """A write was refused for want of the right bearer token (401)."""

    exit_code = EXIT_UNAUTHORIZED


@dataclass(frozen=True, slots=True)
class Reconnecting:
    """Passed to `follow`'s `on_reconnect`: why the stream dropped and when it retries."""

    reason: str
    """What happened (`connection refused`, `stream ended`, ...)."""
    delay: float
    """Seconds before the next attempt."""
    next_seq: int
    """The seq the stream resumes from."""


class DaemonClient:
    """A synchronous client of one daemon.

    Args:
        url: the daemon's base URL (`http://127.0.0.1:8470`).
        token: the bearer token for writes, or None.
        token_env: the variable the token came from (named in 401 messages).
        timeout: seconds to connect and for each read (streams allow longer silences).
        transport: an httpx transport (tests).
    """

    def __init__(
        self,
        url: str = DEFAULT_URL,
        *,
        token: str | None = None,
        token_env: str = "NUCLEUS_TOKEN",
        timeout: float = _READ_TIMEOUT,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        self.token_env = token_env
        self._has_token = bool(token)
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        headers["User-Agent"] = "nucleus-cli"
        try:
            # No idle keep-alive connections: one left in the pool (e.g. from the reads
            # before `tail --follow` streams) holds a stopping daemon for its whole
            # graceful_timeout. A connection per request costs little on a CLI's scale.
            self._http = httpx.Client(
                base_url=self.url,
                headers=headers,
                timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)),
                transport=transport,
                limits=httpx.Limits(max_keepalive_connections=0),
            )
        except (ValueError, httpx.InvalidURL) as exc:
            raise DaemonUnreachable(f"--url {url!r} is not a usable URL: {exc}") from None

    def __enter__(self) -> DaemonClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the connections."""
        self._http.close()

    # -- plumbing ------------------------------------------------------------------------
    def _unreachable(self, exc: httpx.HTTPError) -> DaemonUnreachable:
        return DaemonUnreachable(
            f"cannot reach the daemon at {self.url}: {_what(exc)} ({exc}); is `nucleus run` "
            "running there? (set the address with --url or $NUCLEUS_URL)"
        )

    def _request(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise self._unreachable(exc) from exc
        return self._json(response)

    def _json(self, response: httpx.Response) -> Any:
        if response.is_success:
            try:
                return response.json()
            except ValueError:
                raise self._not_a_daemon(response) from None
        raise self._error(response)

    def _not_a_daemon(self, response: httpx.Response) -> DaemonUnreachable:
        return DaemonUnreachable(
            f"{self.url} answered {response.request.method} {response.request.url.path} with "
            f"{response.status_code} {response.headers.get('content-type', '')!r}: it does not "
            "look like a nucleus daemon (check --url)"
        )

    def _error(self, response: httpx.Response) -> ClientError:
        try:
            problem = response.json()
        except ValueError:
            problem = None
        if not isinstance(problem, dict) or "type" not in problem:
            if response.status_code == 404:
                return self._not_a_daemon(response)
            text = response.text[:200]
            return ApiError(
                f"the daemon answered {response.status_code}: {text}",
                status=response.status_code,
                problem={},
            )
        status = response.status_code
        detail = str(problem.get("detail", ""))
        if status == 401:
            hint = (
                f"${self.token_env} holds a token the daemon does not accept"
                if self._has_token
                else f"${self.token_env} is not set"
            )
            return Unauthorized(
                f"the daemon refused the write: it needs its API token and {hint}; set "
                f"${self.token_env} to the daemon's token",
                status=status,
                problem=problem,
            )
        return ApiError(f"{detail} ({status})", status=status, problem=problem)

    # -- reads ---------------------------------------------------------------------------
    def ledgers(self) -> list[dict[str, Any]]:
        """`[{"id", "length", "phase"}, ...]` in configuration order."""
        body = self._request("GET", "/v1/ledgers")
        ledgers = body.get("ledgers") if isinstance(body, dict) else None
        if not isinstance(ledgers, list):
            raise DaemonUnreachable(f"{self.url}/v1/ledgers is not a nucleus daemon's answer")
        return ledgers

    def pick_ledger(self, ledger: str | None) -> str:
        """`ledger`, or the daemon's only ledger when None.

        Raises:
            ApiError: None was given and the daemon serves several ledgers (exit 2).
        """
        if ledger is not None:
            return ledger
        ids = [str(item.get("id")) for item in self.ledgers()]
        if len(ids) == 1:
            return ids[0]
        raise ApiError(
            f"the daemon serves {len(ids)} ledgers ({', '.join(ids)}): choose one with --ledger",
            status=400,
            problem={},
        )

    def head(self, ledger: str) -> dict[str, Any]:
        """`{"ledger", "length", "head", "phase"}`."""
        result: dict[str, Any] = self._request("GET", f"/v1/ledgers/{ledger}/head")
        return result

    def modules(self, ledger: str) -> list[dict[str, Any]]:
        """Module statuses (with `info`), in start order."""
        result: list[dict[str, Any]] = self._request("GET", f"/v1/ledgers/{ledger}/modules")[
            "modules"
        ]
        return result

    def page(self, ledger: str, start: int, limit: int) -> dict[str, Any]:
        """One range read: `{"entries", "next"}`."""
        result: dict[str, Any] = self._request(
            "GET", f"/v1/ledgers/{ledger}/records", params={"start": start, "limit": limit}
        )
        return result

    def entries(
        self, ledger: str, start: int, stop: int, *, page_size: int = 1000
    ) -> Iterator[dict[str, Any]]:
        """Entries `[start, stop)`, page by page (stops early at the head)."""
        seq = start
        while seq < stop:
            page = self.page(ledger, seq, min(page_size, stop - seq))
            entries = page["entries"]
            if not entries:
                return
            yield from entries
            seq = entries[-1]["seq"] + 1

    def follow(
        self,
        ledger: str,
        start: int,
        *,
        reconnect: bool = True,
        on_reconnect: Callable[[Reconnecting], None] | None = None,
        give_up_after: float | None = None,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> Iterator[dict[str, Any]]:
        """Entries from `start` on, then each new one as it commits (server-sent events).

        A dropped connection (the daemon restarted, the network failed, 45 s of silence) is
        retried with backoff (0.2 s doubling to 5 s) and resumes right after the last entry
        received: nothing is skipped or repeated.

        Args:
            ledger: the ledger id.
            start: the first seq.
            reconnect: retry after a dropped connection (else end the iteration).
            on_reconnect: told before each retry.
            give_up_after: stop retrying (raise `DaemonUnreachable`) after this many seconds
                without a connection; None retries forever.
            sleep: how to wait between retries.
            clock: a monotonic clock, for `give_up_after`.

        Raises:
            ApiError: the daemon refused the stream (unknown ledger, ...) or reported that the
                ledger failed or stopped.
            DaemonUnreachable: the first connection failed, or `give_up_after` expired.
        """
        next_seq = start
        delay = 0.2
        connected_once = False
        down_since: float | None = None
        while True:
            reason = "the stream ended (the daemon is shutting down?)"
            try:
                timeout = httpx.Timeout(_STREAM_READ_TIMEOUT, connect=10.0)
                # `Connection: close`: the stream's connection is never reused. A pooled
                # keep-alive connection left idle after the stream ends would hold a stopping
                # daemon for its whole graceful_timeout, and a retry sent on it lands in the
                # daemon that is going away.
                with self._http.stream(
                    "GET",
                    f"/v1/ledgers/{ledger}/stream",
                    params={"from": next_seq},
                    headers={"Accept": "text/event-stream", "Connection": "close"},
                    timeout=timeout,
                ) as response:
                    if response.status_code != 200:
                        response.read()
                        raise self._error(response)
                    connected_once = True
                    down_since = None
                    delay = 0.2
                    for event, data in _events(response.iter_lines()):
                        if event == "entry":
                            entry = json.loads(data)
                            next_seq = entry["seq"] + 1
                            yield entry
                        elif event == "shutdown":
                            # The daemon is stopping: give it time to go before retrying.
                            reason = "the daemon is shutting down"
                            delay = max(delay, SHUTDOWN_RETRY_DELAY)
                            break
                        elif event == "error":
                            problem = json.loads(data)
                            raise ApiError(
                                f"the stream ended: {problem.get('detail', data)}",
                                status=int(problem.get("status", 503)),
                                problem=problem,
                            )
            except httpx.HTTPError as exc:
                if not connected_once:
                    raise self._unreachable(exc) from exc
                reason = _what(exc)
            if not reconnect:
                return
            now = clock()
            down_since = now if down_since is None else down_since
            if give_up_after is not None and now - down_since > give_up_after:
                raise DaemonUnreachable(
                    f"lost the stream from {self.url} and could not resume it for "
                    f"{give_up_after:g} s ({reason})"
                )
            if on_reconnect is not None:
                on_reconnect(Reconnecting(reason, delay, next_seq))
            sleep(delay)
            delay = min(delay * 2, 5.0)

    # -- proofs --------------------------------------------------------------------------
    def checkpoint(self, ledger: str) -> str:
        """The ledger's latest signed checkpoint (the note's text)."""
        try:
            response = self._http.request("GET", f"/v1/ledgers/{ledger}/checkpoint")
        except httpx.HTTPError as exc:
            raise self._unreachable(exc) from exc
        if not response.is_success:
            raise self._error(response)
        return response.text

    def inclusion_proof(self, ledger: str, seq: int, size: int | None = None) -> dict[str, Any]:
        """`{"seq", "size", "leaf", "path", "root"}` (hashes in hex)."""
        params = {"seq": seq} if size is None else {"seq": seq, "size": size}
        result: dict[str, Any] = self._request(
            "GET", f"/v1/ledgers/{ledger}/proof/inclusion", params=params
        )
        return result

    def consistency_proof(
        self, ledger: str, old_size: int, new_size: int | None = None
    ) -> dict[str, Any]:
        """`{"from", "to", "old_root", "new_root", "path"}` (hashes in hex)."""
        params = {"from": old_size} if new_size is None else {"from": old_size, "to": new_size}
        result: dict[str, Any] = self._request(
            "GET", f"/v1/ledgers/{ledger}/proof/consistency", params=params
        )
        return result

    def entry(self, ledger: str, seq: int) -> dict[str, Any]:
        """One entry: `{"seq", "kind", "payload", "meta", "timestamp", "hash"}`."""
        result: dict[str, Any] = self._request("GET", f"/v1/ledgers/{ledger}/records/{seq}")
        return result

    # -- writes --------------------------------------------------------------------------
    def append(self, ledger: str, record: Mapping[str, Any]) -> dict[str, Any]:
        """Append one record (`{"kind", "payload", "meta"?}`); return its receipt."""
        result: dict[str, Any] = self._request(
            "POST", f"/v1/ledgers/{ledger}/records", json=dict(record)
        )
        return result

    def append_batch(
        self, ledger: str, records: Iterable[Mapping[str, Any]]
    ) -> list[dict[str, Any]]:
        """Append records all-or-nothing; return their receipts."""
        body = {"records": [dict(record) for record in records]}
        result: list[dict[str, Any]] = self._request(
            "POST", f"/v1/ledgers/{ledger}/records/batch", json=body
        )["receipts"]
        return result


SHUTDOWN_RETRY_DELAY: Final = 1.0
"""Seconds `follow` waits before reconnecting after the daemon said it is shutting down."""


def _what(exc: httpx.HTTPError) -> str:
    names: dict[type[httpx.HTTPError], str] = {
        httpx.ConnectError: "connection failed",
        httpx.ConnectTimeout: "connection timed out",
        httpx.ReadTimeout: "no answer in time",
        httpx.ReadError: "the connection broke",
        httpx.RemoteProtocolError: "the connection broke or the answer is not HTTP",
    }
    return names.get(type(exc), type(exc).__name__)


def _events(lines: Iterable[str]) -> Iterator[tuple[str, str]]:
    """`(event, data)` of each server-sent event (comments skipped; `event` defaults to
    "message")."""
    event, data = "message", list[str]()
    for line in lines:
        if not line:
            if data:
                yield event, "\n".join(data)
            event, data = "message", []
        elif line.startswith(":"):
            continue
        else:
            field, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if field == "event":
                event = value
            elif field == "data":
                data.append(value)
