# -*- test-case-name: tests.test_groupserver,tests.integration.test_fault_matrix,tests.integration.test_faults -*-
"""
What the outcome of a call to a GroupServer page means for the sending MTA:
the L{GroupServerError} (reply code, and whether the post may have been
acted on: C{outcome_unknown}) for a connection, TLS, timeout or spool
failure, for an HTTP status other than 200, and for a 200 page whose status
message is not a success; and which failures may be retried on a new
connection (L{_StaleConnection}).

Not here: reading a page's status message (L{gsmail.answers}), the calls,
their timeouts and the retry itself (L{gsmail.groupserver}), the
connections (L{gsmail.groupserver.http}).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

from OpenSSL import SSL
from service_identity import VerificationError
from twisted.internet.defer import CancelledError
from twisted.internet.error import (
    ConnectError,
    ConnectingCancelledError,
    DNSLookupError,
)
from twisted.internet.error import TimeoutError as ConnectTimeoutError
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import (
    RequestGenerationFailed,
    RequestTransmissionFailed,
    ResponseFailed,
)

from gsmail import status
from gsmail.answers import PageResult, PageStatus, read_status
from gsmail.groupserver.body import SpoolReadError
from gsmail.groupserver.http import MAX_REPLY_SIZE, _ReplyTooLarge
from gsmail.status import GroupServerError

if TYPE_CHECKING:
    from gsmail.groupserver.body import MultipartBody

# Statuses from a reverse proxy that may have handed the request on before it
# gave up waiting: the post may still be added.
_PROXY_GAVE_UP: Final = frozenset({502, 504})


class _StaleConnection(Exception):
    """
    A connection failed before any byte of the response arrived; an
    idempotent call may be repeated once on a new connection.
    """

    def __init__(self, error: GroupServerError) -> None:
        super().__init__(str(error))
        self.error = error


def _reasons(exc: BaseException) -> list[BaseException]:
    """The wrapped causes of a twisted.web client error, else C{[exc]}."""
    wrapped = getattr(exc, "reasons", None)
    if isinstance(wrapped, list):
        return [f.value for f in wrapped if isinstance(f, Failure) and f.value is not None]
    return [exc]


def _is_cancellation(exc: BaseException) -> bool:
    """C{exc} is, or wraps, the cancellation of a request or connection attempt."""
    kinds = (CancelledError, ConnectingCancelledError)
    return isinstance(exc, kinds) or any(isinstance(r, kinds) for r in _reasons(exc))


def _is_tls_failure(exc: BaseException) -> bool:
    """A TLS handshake failure: protocol error, untrusted or misnamed certificate."""
    return isinstance(exc, (SSL.Error, VerificationError))


def _describe(exc: BaseException) -> str:
    """A short, token-free description of a connection failure."""
    name = type(exc).__name__
    # OpenSSL errors are lists of tuples; the last names the reason.
    if isinstance(exc, SSL.Error) and exc.args and isinstance(exc.args[0], list) and exc.args[0]:
        last = exc.args[0][-1]
        if isinstance(last, tuple) and last:
            return f"TLS: {last[-1]}"
    text = str(exc).strip()
    return f"{name}: {text}" if text else name


def _map_failure(
    page: str, exc: Exception, body: MultipartBody, acts: bool, log: Logger
) -> GroupServerError:
    """
    The L{GroupServerError} for a failed exchange with C{page}.

    @param body: the request body, complete or not (was the whole post sent?).
    @param acts: the page changes GroupServer's state (add, relay, bounce).
    @param log: the client's logger, for a failure of an unexpected kind.
    """
    reasons = _reasons(exc)
    tls = [r for r in reasons if _is_tls_failure(r)]
    if tls:
        # The handshake failed: no request byte reached the page.
        return GroupServerError(status.GROUPSERVER_UNREACHABLE, _describe(tls[0]))
    if isinstance(exc, (ConnectError, DNSLookupError, ConnectTimeoutError)):
        return GroupServerError(status.GROUPSERVER_UNREACHABLE, _describe(exc))
    if isinstance(exc, RequestGenerationFailed):
        spool = [r for r in reasons if isinstance(r, SpoolReadError)]
        if spool:
            return GroupServerError(status.LOCAL_ERROR, str(spool[0]))
        return GroupServerError(status.LOCAL_ERROR, "could not build the request")
    if isinstance(exc, RequestTransmissionFailed):
        return GroupServerError(
            status.GROUPSERVER_UNREACHABLE,
            "connection lost while sending the request: "
            + ", ".join(_describe(r) for r in reasons),
        )
    if isinstance(exc, ResponseFailed):
        # ResponseNeverReceived included: the request was sent (unless
        # the server answered early and then hung up).
        if acts and body.complete:
            return GroupServerError(
                status.OUTCOME_UNKNOWN,
                f"connection lost waiting for the {page} page: "
                + ", ".join(_describe(r) for r in reasons),
                outcome_unknown=True,
            )
        return GroupServerError(
            status.GROUPSERVER_UNREACHABLE,
            "connection lost waiting for the answer: " + ", ".join(_describe(r) for r in reasons),
        )
    if isinstance(exc, _ReplyTooLarge):
        return GroupServerError(
            status.GROUPSERVER_BAD_REPLY,
            f"the answer was longer than {MAX_REPLY_SIZE} bytes",
            outcome_unknown=acts,
        )
    log.failure(
        "Unexpected failure calling the GroupServer {page} page",
        Failure(exc),  # type: ignore[no-untyped-call]
        page=page,
    )
    return GroupServerError(
        status.GROUPSERVER_UNREACHABLE,
        type(exc).__name__,
        outcome_unknown=acts and body.complete,
    )


def _status_error(code: int, acts: bool) -> GroupServerError:
    return GroupServerError(
        status.GROUPSERVER_ERROR,
        f"HTTP status {code}",
        outcome_unknown=acts and code in _PROXY_GAVE_UP,
    )


def _check_post_reply(page: str, code: int, body: bytes) -> PageStatus:
    """
    The status of C{page}'s (add, relay, bounce) answer when it is a success:
    200 and the status message C{Done} (the bounce page: also C{No user found
    for ...}).

    @raise GroupServerError: 4.5.0 for another HTTP status (C{outcome_unknown}
        for a proxy's 502/504) or for a page without a status message
        (L{status.GROUPSERVER_NOT_RUN}); 4.3.5 for an error status
        (L{status.GROUPSERVER_REFUSED}); 4.5.0 with C{outcome_unknown} for a
        status that is none of GroupServer's.
    """
    if code != 200:
        raise _status_error(code, acts=True)
    found = read_status(body)
    if found.result is PageResult.DONE:
        return found
    if found.result is PageResult.NO_USER and page == "bounce":
        return found
    raise _page_error(page, found)


def _page_error(page: str, found: PageStatus) -> GroupServerError:
    """The error for a 200 page whose status message is not a success."""
    name = "group-exists" if page == "exists" else page
    if found.result is PageResult.REFUSED:
        return GroupServerError(
            status.GROUPSERVER_REFUSED, f"the {name} page refused it: {found.describe()}"
        )
    if found.result is PageResult.NOT_RUN:
        return GroupServerError(
            status.GROUPSERVER_NOT_RUN, f"the {name} page answered 200 with {found.describe()}"
        )
    return GroupServerError(
        status.GROUPSERVER_BAD_REPLY,
        f"the {name} page answered an unexpected {found.describe()}",
        outcome_unknown=page != "exists",
    )
