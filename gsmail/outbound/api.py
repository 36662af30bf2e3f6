# -*- test-case-name: tests.outbound.test_api -*-
"""
The Python API for Twisted applications that send mail through gsmail:
gs.email's C{send_email(sender, recipients, message, xverp=False)}, made
asynchronous.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from twisted.internet.defer import Deferred, succeed

from gsmail.addresses import AddressError, parse_mailbox
from gsmail.outbound.queue import OutboundQueue

__all__ = ["Mailer"]


class Mailer:
    """
    Queues mail for delivery by gsmail.

    @param queue: the outbound queue (loaded).
    @param delivery: the L{gsmail.outbound.delivery.OutboundDelivery} to wake
        after each message, or C{None} (queue only, gs.email's
        C{processorthread = False}).
    """

    def __init__(self, queue: OutboundQueue, delivery: Any = None) -> None:
        self.queue = queue
        self.delivery = delivery

    def send_email(
        self,
        sender: str,
        recipients: str | Iterable[str],
        message: bytes,
        xverp: bool = False,
    ) -> Deferred[dict[str, bool]]:
        """
        Queue C{message} for C{recipients}.

        @param sender: the envelope sender, e.g. the group's address; with
            C{xverp}, each recipient gets C{group+user=domain@site} as Postfix's
            XVERP makes it.
        @param recipients: the envelope recipients, C{local@domain}: a
            sequence (or any iterable) of addresses, or one address as a
            C{str}, as gs.email's C{send_email} takes it (never split into
            characters). Repeats are queued once.
        @param message: the whole message, header and body (LF or CRLF). It
            is DKIM-signed when a key is configured for its domain
            (L{gsmail.signing}).
        @return: a Deferred firing, once the message is fsynced in the queue,
            with C{{recipient: queued}}: C{False} for an address that does not
            parse (it is not queued). Fails with C{OSError} when the queue
            cannot store it (nothing was queued).
        """
        if isinstance(recipients, str):
            recipients = [recipients]
        wanted = list(dict.fromkeys(recipients))
        good = []
        for address in wanted:
            try:
                parse_mailbox(address)
            except AddressError:
                continue
            good.append(address)
        result = {address: address in good for address in wanted}
        if not good:
            return succeed(result)
        d = self.queue.enqueue(sender, good, message, xverp=xverp, sign=True)

        def queued(envelope: Any) -> dict[str, bool]:
            if self.delivery is not None:
                self.delivery.kick()
            return result

        return d.addCallback(queued)
