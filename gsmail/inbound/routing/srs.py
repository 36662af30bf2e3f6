# -*- test-case-name: tests.inbound.test_routing -*-
"""
The Sender Rewriting Scheme of forward routes (L{SrsCodec}): the sender a
forwarded message gets, and where a bounce to such a sender goes back to.

Only the address codec: the forward action that uses it is in
L{gsmail.inbound.routing.actions}, the check of a bounce at RCPT time in
L{gsmail.inbound.routing.RouteActions.check_srs}.
"""

from __future__ import annotations

import re

from twisted.internet.interfaces import IReactorTime

from gsmail.addresses import Address

__all__ = ["SrsCodec"]


class SrsCodec:
    """
    The Sender Rewriting Scheme (Shevek's SRS paper, the "guarded" scheme of
    libsrs2: C{SRS0=HHHH=TT=domain=local@ours} and C{SRS1=...} for a sender
    that is already an SRS0 address) with the srslib library. The secret
    is derived from the first VERP key (L{gsmail.verp}), older keys still
    reverse, so the one key file rotates both.

    @param keys: the VERP keys, first signs.
    @param clock: for the day stamp (SRS0 addresses are valid 21 days).
    """

    def __init__(self, keys: tuple[bytes, ...], clock: IReactorTime) -> None:
        import hashlib
        import hmac

        import srslib

        secrets_ = [hmac.new(k, b"gsmail-srs-1", hashlib.sha256).hexdigest() for k in keys]
        self._srs = srslib.SRS(secrets_[0], prev_secrets=secrets_[1:])
        # srslib reads the time through this attribute (its own test hook).
        self._srs._time_fn = clock.seconds
        self._error = srslib.Error

    @staticmethod
    def is_srs(address: Address) -> bool:
        """Whether the local part is of the SRS0 or SRS1 form (not checked)."""
        return bool(re.match(r"SRS[01][-+=]", address.local, re.IGNORECASE))

    def forward(self, sender: str, domain: str) -> str:
        """The SRS address at C{domain} for C{sender} (an SRS1 one for an SRS0 sender)."""
        return str(self._srs.forward(sender, domain))

    def reverse(self, address: Address) -> str | None:
        """Where a bounce to C{address} goes, or C{None}: a bad hash or an old stamp."""
        try:
            return str(self._srs.reverse(str(address)))
        except (self._error, ValueError):
            return None
