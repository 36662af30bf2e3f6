# -*- test-case-name: tests.test_eager -*-
"""
Small writes sent at once, in the reactor turn that made them.

A Twisted TCP transport keeps every C{write} in its buffer until the reactor
finds the socket writable: one C{epoll_ctl} to watch for that, one more turn
of the reactor, C{send(2)}, and another C{epoll_ctl} to stop watching. For a
reply or a pipelined group of commands (a few dozen bytes to a few KiB) on a
socket with nothing queued, one C{send(2)} does the same. The outbound side
writes once per submission reply (smtplib waits for each RCPT's) and once or
twice per transaction it delivers: two of the five reactor events it took
per recipient.
"""

from __future__ import annotations

from typing import Any

from gsmail.twistedcompat import idle_tcp_connection

__all__ = ["write_now"]


def _idle(transport: Any) -> bool:
    """
    Is C{transport} a plain (not TLS) TCP or UNIX connection, open, with
    nothing buffered and no producer? Anything else, or a Twisted whose
    transports look different, answers C{False}: the caller writes as usual.
    """
    return idle_tcp_connection(transport)


def write_now(transport: Any, data: bytes) -> None:
    """
    Write C{data} to C{transport}: with one C{send(2)} now when the
    transport is idle (see L{_idle}), else with C{transport.write}. What
    C{send} does not take (a full socket buffer) goes to C{transport.write},
    behind nothing, so the bytes keep their order; an error (C{EPIPE},
    C{ECONNRESET}) is left for the transport's own write to find, which
    reports the connection lost as usual.

    @param transport: the protocol's transport (any L{ITransport}).
    @param data: the bytes to send.
    """
    if data and _idle(transport):
        try:
            sent = transport.socket.send(data)
        except OSError:
            sent = 0
        if sent == len(data):
            return
        data = data[sent:]
    transport.write(data)
