# -*- test-case-name: tests.outbound.test_mtasts,tests.integration.test_mta_sts -*-
"""
The MTA-STS policy cache (RFC 8461 §5.1: a cached unexpired policy applies
even when the fetch fails): policies by domain, with their C{id} and time
of fetch, one JSON file per domain under the state directory, written
atomically off the reactor thread, so they survive a restart. Also the
atomic file write and the inline C{blocking} runner the TLS-RPT counts
(L{gsmail.outbound.tlsrpt}) share.

Not here: parsing policies (L{gsmail.outbound.mtasts.policy}) or deciding
which one applies (L{gsmail.outbound.mtasts}).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable

import attrs
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from gsmail.outbound.mtasts.policy import MAX_POLICY_SIZE, Policy, PolicyError, parse_policy

__all__ = [
    "Blocking",
    "PolicyCache",
    "StoredPolicy",
    "run_inline",
    "write_atomically",
]

log = Logger()


@attrs.frozen
class StoredPolicy:
    """
    A policy as cached: the domain's, with the C{id} it was published under.

    @ivar fetched: when it was fetched, seconds since the epoch.
    """

    domain: str
    policy_id: str
    fetched: float
    policy: Policy

    @property
    def expires(self) -> float:
        """When the policy may no longer be used, seconds since the epoch."""
        return self.fetched + self.policy.max_age

    def to_json(self) -> bytes:
        return json.dumps(
            {
                "domain": self.domain,
                "id": self.policy_id,
                "fetched": self.fetched,
                "policy": self.policy.text,
            },
            sort_keys=True,
        ).encode()

    @classmethod
    def from_json(cls, data: bytes) -> StoredPolicy:
        """@raise ValueError: not a stored policy. @raise PolicyError: its text is invalid."""
        fields = json.loads(data)
        if not isinstance(fields, dict):
            raise ValueError("not an object")
        domain, policy_id, fetched, text = (
            fields.get("domain"),
            fields.get("id"),
            fields.get("fetched"),
            fields.get("policy"),
        )
        if not (
            isinstance(domain, str)
            and isinstance(policy_id, str)
            and isinstance(fetched, int | float)
            and isinstance(text, str)
        ):
            raise ValueError("missing fields")
        return cls(domain, policy_id, float(fetched), parse_policy(text))


Blocking = Callable[[Callable[[], None]], Deferred[None]]


def run_inline(job: Callable[[], None]) -> Deferred[None]:
    """Run C{job} now, in this thread (tests, tools): its exception fails the Deferred."""
    try:
        job()
    except Exception as e:
        return fail(e)
    return succeed(None)


class PolicyCache:
    """
    Policies by domain, in memory and one file per domain
    (C{DOMAIN.json} in L{directory}), written atomically (a temporary
    file, fsync, rename, fsync of the directory) by C{blocking}, so a
    restart finds them again.

    @ivar directory: where the files are.
    """

    def __init__(
        self,
        directory: str,
        clock: IReactorTime,
        blocking: Blocking | None = None,
        max_entries: int = 10_000,
    ) -> None:
        """
        @param blocking: runs a blocking callable off the reactor thread
            (a thread pool hand-off, or a L{gsmail.handoff.SerialThread});
            C{None}: inline (tests, tools).
        @param max_entries: at most this many domains are kept in memory.
        """
        self.directory = os.path.abspath(directory)
        self._clock = clock
        self._blocking = blocking or run_inline
        self._max = max_entries
        self._policies: dict[str, StoredPolicy] = {}

    def load(self) -> None:
        """
        Create the directory, read every cached policy, remove expired and
        broken files (logged). Blocking: call at start-up.

        @raise OSError: the directory cannot be created or read.
        """
        os.makedirs(self.directory, mode=0o750, exist_ok=True)
        now = self._clock.seconds()
        for name in sorted(os.listdir(self.directory)):
            path = os.path.join(self.directory, name)
            if name.endswith(".tmp"):
                _remove(path)
                continue
            if not name.endswith(".json") or len(self._policies) >= self._max:
                continue
            try:
                with open(path, "rb") as f:
                    stored = StoredPolicy.from_json(f.read(MAX_POLICY_SIZE * 2))
            except (OSError, ValueError, PolicyError) as e:
                log.warn(
                    "Removing the unreadable MTA-STS cache file {path}: {error}",
                    path=path,
                    error=str(e),
                )
                _remove(path)
                continue
            if stored.expires <= now or name != _file_name(stored.domain):
                _remove(path)
                continue
            self._policies[stored.domain] = stored

    def get(self, domain: str) -> StoredPolicy | None:
        """The cached policy of C{domain}, expired or not, or C{None}."""
        return self._policies.get(domain)

    def domains(self) -> list[str]:
        """The domains with a cached policy."""
        return list(self._policies)

    def put(self, stored: StoredPolicy) -> Deferred[None]:
        """
        Cache C{stored}, replacing the domain's policy; the file is written
        by the hand-off.

        @return: fires when the file is durable (or fails with the
            C{OSError}, which is also logged: the memory copy still applies).
        """
        if stored.domain not in self._policies and len(self._policies) >= self._max:
            del self._policies[next(iter(self._policies))]
        self._policies[stored.domain] = stored
        path = os.path.join(self.directory, _file_name(stored.domain))
        data = stored.to_json()
        d = self._blocking(lambda: write_atomically(path, data))

        def failed(failure: Failure) -> Failure:
            log.error(
                "Could not save the MTA-STS policy of {domain} in {path}: {error}",
                domain=stored.domain,
                path=path,
                error=str(failure.value),
            )
            return failure

        return d.addErrback(failed)

    def forget(self, domain: str) -> Deferred[None]:
        """Drop the cached policy of C{domain} (an expired one)."""
        if self._policies.pop(domain, None) is None:
            return succeed(None)
        path = os.path.join(self.directory, _file_name(domain))
        return self._blocking(lambda: _remove(path))


def _file_name(domain: str) -> str:
    return domain + ".json"


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def write_atomically(path: str, data: bytes) -> None:
    """Write C{data} to C{path} so that a crash leaves the old or the new file."""
    directory = os.path.dirname(path)
    tmp = f"{path}.{os.getpid()}.{id(data):x}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
