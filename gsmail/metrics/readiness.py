# -*- test-case-name: tests.test_metrics -*-
"""
The checks of C{/readyz} (L{Readiness}): 200 when every listener is up,
GroupServer answered its last check (L{GroupServerProbe}: a group-exists
call, cached), the ledger's last write worked, the ledger and spool
directories are writable and free space is above C{readyz_min_free}; else
503 with one line per failed check.

Not the HTTP resource that answers (L{gsmail.metrics.http}) nor the
metrics (L{gsmail.metrics}); a check only sets C{gsmail_ready}.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.defer import TimeoutError as DeferredTimeout
from twisted.python.failure import Failure

from gsmail.metrics.gauges import free_bytes

if TYPE_CHECKING:
    from gsmail.metrics import Metrics

__all__ = ["GroupServerProbe", "Readiness"]


class GroupServerProbe:
    """
    Whether GroupServer answers: one group-exists call for C{address} (any
    answer, group or no group, is an answer; a refusal of the token is
    not), at most once per C{ttl} seconds, bounded by C{timeout}; concurrent
    checks share the call.

    @param client: a L{gsmail.groupserver.GroupServerClient}.
    @param clock: the reactor (C{seconds}, C{callLater}).
    """

    def __init__(
        self, client: Any, address: str, clock: Any, ttl: float = 5.0, timeout: float = 5.0
    ) -> None:
        self.client = client
        self.address = address
        self.clock = clock
        self.ttl = ttl
        self.timeout = timeout
        self._checked_at: float | None = None
        self._problem: str | None = None
        self._running: list[Deferred[str | None]] = []

    def check(self) -> Deferred[str | None]:
        """
        Fires with C{None} when GroupServer answered, else a one-line
        problem. Never fails.
        """
        now = self.clock.seconds()
        if self._checked_at is not None and now - self._checked_at < self.ttl:
            return succeed(self._problem)
        d: Deferred[str | None] = Deferred()
        self._running.append(d)
        if len(self._running) == 1:
            self._start()
        return d

    def _start(self) -> None:
        lookup: Deferred[Any] = self.client.lookup_group(self.address, quiet=True)
        lookup.addTimeout(self.timeout, self.clock)

        def answered(_: object) -> None:
            self._done(None)

        def failed(failure: Failure) -> None:
            if failure.check(DeferredTimeout):
                why = f"no answer within {self.timeout:g} s"
            else:
                why = str(failure.value) or type(failure.value).__name__
            self._done(f"groupserver: {self.client!r} does not answer: {why}")

        lookup.addCallbacks(answered, failed)

    def _done(self, problem: str | None) -> None:
        self._checked_at = self.clock.seconds()
        self._problem = problem
        waiting, self._running = self._running, []
        for d in waiting:
            d.callback(problem)


class Readiness:
    """
    The checks of C{/readyz}.

    @param listeners: returns one line per listener that is not up.
    @param probe: the GroupServer check, or C{None}.
    @param writable: C{{"ledger": directory, ...}}: each must be writable.
    @param ledger_ok: returns a problem line when the ledger's last write
        failed, else C{None}.
    @param min_free: the least free space, in bytes, on each of those
        directories' file systems (C{readyz_min_free}); 0 turns it off.
    """

    def __init__(
        self,
        *,
        listeners: Callable[[], Sequence[str]],
        probe: GroupServerProbe | None,
        writable: dict[str, str],
        min_free: int,
        ledger_ok: Callable[[], str | None] = lambda: None,
        metrics: Metrics | None = None,
    ) -> None:
        self.listeners = listeners
        self.probe = probe
        self.writable = writable
        self.min_free = min_free
        self.ledger_ok = ledger_ok
        self.metrics = metrics

    async def problems(self) -> list[str]:
        """Every failed check, one line each; empty when ready."""
        found = list(self.listeners())
        if self.probe is not None:
            problem = await self.probe.check()
            if problem:
                found.append(problem)
        ledger = self.ledger_ok()
        if ledger:
            found.append(ledger)
        for name, path in self.writable.items():
            if not os.access(path, os.W_OK | os.X_OK):
                found.append(f"{name}: {path} is not writable")
                continue
            if self.min_free:
                free = free_bytes(path)
                if free is not None and free < self.min_free:
                    found.append(
                        f"{name}: {free // (1024 * 1024)} MiB free on {path}, below"
                        f" readyz_min_free ({self.min_free // (1024 * 1024)} MiB)"
                    )
        if self.metrics is not None:
            self.metrics.ready.set(0 if found else 1)
        return found
