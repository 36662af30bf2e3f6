# -*- test-case-name: tests.inbound.test_routing,tests.test_report -*-
"""
The files route actions keep, each written whole and fsynced (blocking:
call them in a thread): the sequence numbers per route
(L{SequenceStore}), the copies of refused or failed messages with their
JSON sidecars (L{keep_copy}, read by L{gsmail.report}), and the Maildir
archives (C{archive} routes).

Not the spool (L{gsmail.inbound.spool}), nor the postmaster's Maildir
(L{gsmail.inbound.postmaster}), nor when these are written
(L{gsmail.inbound.routing}).
"""

from __future__ import annotations

import fcntl
import json
import mailbox
import os
import re
import secrets
from datetime import UTC, datetime
from typing import Any

__all__ = ["SequenceStore", "keep_copy"]

#: Message-to-sequence-number pairs remembered per route, so a message the
#: sender retries keeps its number (and so its content).
SEQUENCE_MEMORY = 1000


class SequenceStore:
    """
    Durable sequence numbers per route (DeleGate's C{count} file and its
    C{isn} option): one file per route in C{directory} holding the last
    number and the numbers given to recent messages, so a message the
    sender retries gets its number again. Written to a temporary file,
    fsynced and renamed; C{flock} keeps processes sharing the directory
    (inbound workers) from giving one number twice. Blocking: call it in a
    thread.
    """

    def __init__(self, directory: str) -> None:
        self.directory = directory

    def path(self, route: str) -> str:
        """The file of C{route}: its name made safe."""
        safe = re.sub(r"[^A-Za-z0-9@._-]", "_", route)[:100]
        return os.path.join(self.directory, f"{safe}.seq")

    def number(self, route: str, digest: str) -> int:
        """
        The number of the message with content C{digest} on C{route}: the
        one it had, or the next one (the first is 1).

        @raise OSError: the file cannot be read or written.
        """
        os.makedirs(self.directory, exist_ok=True)
        path = self.path(route)
        with open(path + ".lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            last, recent = self._read(path)
            if digest in recent:
                return recent[digest]
            last += 1
            recent[digest] = last
            while len(recent) > SEQUENCE_MEMORY:
                del recent[next(iter(recent))]
            text = f"{last}\n" + "".join(f"{d} {n}\n" for d, n in recent.items())
            temporary = f"{path}.{os.getpid()}.new"
            with open(temporary, "w", encoding="ascii") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.replace(temporary, path)
            _fsync_directory(self.directory)
            return last

    @staticmethod
    def _read(path: str) -> tuple[int, dict[str, int]]:
        try:
            with open(path, encoding="ascii") as f:
                lines = f.read().splitlines()
        except FileNotFoundError:
            return 0, {}
        last = int(lines[0]) if lines and lines[0].isdigit() else 0
        recent: dict[str, int] = {}
        for line in lines[1:]:
            digest, _, number = line.partition(" ")
            if number.isdigit():
                recent[digest] = int(number)
        return last, recent


def _fsync_directory(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def keep_copy(
    directory: str, source: str, prefix: bytes, sidecar: dict[str, Any], now: float
) -> str:
    """
    Store a copy of a message with a JSON sidecar (C{NAME.eml},
    C{NAME.json}) in C{directory} (made if missing). Blocking.

    @param source: the message file.
    @param prefix: bytes put before it (trace fields).
    @param sidecar: what the operator needs (time, envelope, route, reply, traceback).
    @return: the path of the copy.
    @raise OSError: it cannot be written.
    """
    os.makedirs(directory, exist_ok=True)
    stamp = datetime.fromtimestamp(now, UTC).strftime("%Y%m%dT%H%M%SZ")
    name = f"{stamp}-{secrets.token_hex(4)}"
    path = os.path.join(directory, name + ".eml")
    with open(path, "wb") as out, open(source, "rb") as f:
        out.write(prefix)
        while chunk := f.read(1 << 16):
            out.write(chunk)
    with open(os.path.join(directory, name + ".json"), "w", encoding="utf-8") as f:
        json.dump({"time": now, "file": name + ".eml", **sidecar}, f, indent=1, sort_keys=True)
    return path


def _store_maildir(path: str, source: str) -> None:
    """Add the file C{source} to the Maildir C{path} (made if missing), fsynced. Blocking."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    box = mailbox.Maildir(path, factory=None, create=True)
    with open(source, "rb") as f:
        box.add(f)
    _fsync_directory(os.path.join(path, "new"))
