# -*- test-case-name: tests.inbound.test_routing -*-
"""
The news gateway of C{nntp} routes: the message made a news article
(L{make_article}, RFC 5536) and posted with C{nntplib} in a thread
(L{nntp_post}).

Not when an article is posted (once per message, through the ledger:
L{gsmail.inbound.routing}), nor the C{nntp} option's syntax
(L{gsmail.routes.table.NntpTarget}).
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable
from typing import IO

from twisted.internet.defer import Deferred

from gsmail import status
from gsmail.inbound.routing.message import _header_fields
from gsmail.inbound.routing.work import Blocking, _ActionFailed
from gsmail.routes import NntpTarget, one_line

__all__ = ["NntpPost", "make_article", "nntp_post"]

#: Posts an article (bytes, LF line ends) to a news server; fires once it took it.
NntpPost = Callable[[NntpTarget, bytes], "Deferred[None]"]

#: Header fields a news server refuses or sets itself (RFC 5536 §3.2, INN's
#: nnrpd), removed from an article; trace fields of mail with them.
NNTP_DROPPED = frozenset(
    {
        "path",
        "newsgroups",
        "xref",
        "nntp-posting-host",
        "nntp-posting-date",
        "injection-info",
        "injection-date",
        "received",
        "return-path",
        "x-original-to",
        "delivered-to",
        "bcc",
        "lines",
    }
)


def make_article(path: str, newsgroup: str, hostname: str, out: IO[bytes]) -> None:
    """
    Write the message in C{path} as a news article to C{out}: C{Newsgroups}
    set, C{Path} started (C{HOST!not-for-mail}, RFC 5536 §3.1.5), the
    fields a news server refuses or sets itself and mail's trace fields
    removed (L{NNTP_DROPPED}), a C{Subject} added when there is none (RFC
    5536 §3.1 requires one). Blocking.
    """
    with open(path, "rb") as f:
        fields = _header_fields(f)
        kept = [
            b"".join(lines)
            for lines in fields
            if lines[0].split(b":", 1)[0].strip().lower().decode("ascii", "replace")
            not in NNTP_DROPPED
        ]
        names = {k.split(b":", 1)[0].strip().lower() for k in kept}
        out.write(f"Path: {hostname}!not-for-mail\n".encode())
        out.write(f"Newsgroups: {newsgroup}\n".encode())
        if b"subject" not in names:
            out.write(b"Subject: (no subject)\n")
        for field in kept:
            out.write(field)
        out.write(b"\n")
        while chunk := f.read(1 << 16):
            out.write(chunk)


def nntp_post(blocking: Blocking) -> NntpPost:
    """
    An L{NntpPost} over the standard library's C{nntplib} (the
    C{standard-nntplib} distribution from Python 3.13 on), run in a thread:
    connect, C{AUTHINFO USER/PASS} when a user is set, C{POST}, C{QUIT}. A
    C{441} naming a duplicate counts as posted (the sender's retry of an
    article the server has).

    @raise _ActionFailed: (in the Deferred) the server refused or could not
        be reached.
    """

    def post(target: NntpTarget, article: bytes) -> Deferred[None]:
        def job() -> None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                import nntplib
            try:
                server = nntplib.NNTP(
                    target.host,
                    target.port,
                    user=target.user or None,
                    password=target.password or None,
                    readermode=True,
                    usenetrc=False,
                    timeout=60,
                )
            except (OSError, nntplib.NNTPError) as e:
                raise _ActionFailed(
                    status.NNTP_FAILED.with_text(
                        f"News server {target.host}:{target.port} not reachable; try again later"
                    ),
                    why=one_line(str(e))[:200],
                ) from None
            try:
                server.post(io.BytesIO(article))
            except nntplib.NNTPTemporaryError as e:
                if "uplicate" in str(e):
                    return
                raise _ActionFailed(
                    status.NNTP_FAILED.with_text(
                        f"News server refused the article: {one_line(str(e))[:200]}"
                    ),
                    keep=True,
                    why=one_line(str(e))[:200],
                ) from None
            except (OSError, nntplib.NNTPError) as e:
                raise _ActionFailed(status.NNTP_FAILED, why=one_line(str(e))[:200]) from None
            finally:
                try:
                    server.quit()
                except (OSError, EOFError, nntplib.NNTPError):
                    pass

        d: Deferred[None] = blocking(job)
        return d

    return post
