"""
Tests for L{gsmail.bounces}: which messages to a bounce address are failure
reports for the member, on samples in the formats real MTAs send.
"""

from __future__ import annotations

import base64
import os
from collections.abc import Callable

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.logger import LogEvent, formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from gsmail import status
from gsmail.addresses import Address, BounceCheck, Route, RouteKind
from gsmail.bounces import MAX_SCANNED, BounceScreen, FailureReport, classify, read_head
from gsmail.interfaces import MessageSource
from gsmail.outbound.dsn import FailedRecipient, build_dsn
from gsmail.verp import DAY, VerpKeys, VerpPolicy
from tests.bounce_samples import dsn, out_of_office, plain_mail, qmail_bounce

NOW = 1_700_000_000.0
KEY = bytes(range(32))
GROUP = Address("dev", "groups.example.com")
ALICE = Address("alice", "example.org")

#: An old Exim bounce: plain text, with X-Failed-Recipients (no RFC 3464 report).
EXIM_PLAIN = b"""From: Mail Delivery System <Mailer-Daemon@mx.example.org>
To: dev+alice=example.org@groups.example.com
Subject: Mail delivery failed: returning message to sender
X-Failed-Recipients: alice@example.org
Auto-Submitted: auto-replied
Message-Id: <E1r2x3y-0001ab-Cd@mx.example.org>
Date: Tue, 14 Nov 2023 22:13:20 +0000

This message was created automatically by mail delivery software.

A message that you sent could not be delivered to one or more of its
recipients. This is a permanent error. The following address(es) failed:

  alice@example.org
    SMTP error from remote mail server after RCPT TO:<alice@example.org>:
    550 5.1.1 <alice@example.org>: Recipient address rejected: User unknown

------ This is a copy of the message, including all the headers. ------

From: dev@groups.example.com
Subject: Minutes of the meeting

The minutes.
"""


def source(data: bytes, directory: str, in_memory: bool = True) -> MessageSource:
    path = os.path.join(directory, "message")
    with open(path, "wb") as f:
        f.write(data)
    return MessageSource(prefix=b"", path=path, size=len(data), data=data if in_memory else None)


class ClassifyTests(SynchronousTestCase):
    """L{classify} on the reports (and the non-reports) bounce addresses get."""

    def test_postfix_failed(self) -> None:
        """A Postfix DSN with C{Action: failed}, C{Status: 5.1.1}: a failure of that recipient."""
        self.assertEqual(
            classify(dsn("Alice@Example.org")),
            FailureReport("dsn", frozenset({"alice@example.org"})),
        )

    def test_delay_notice(self) -> None:
        """A delay notice (C{Action: delayed}, 4.4.1) reports no failure."""
        self.assertEqual(
            classify(dsn("alice@example.org", action="delayed", status="4.4.1")),
            FailureReport("dsn", frozenset(), "delay notice"),
        )

    def test_given_up_after_transient_failures(self) -> None:
        """
        C{Action: failed} with a 4.x.x status is how Postfix reports a message
        that expired after transient failures: a failure.
        """
        report = classify(dsn("alice@example.org", status="4.4.1"))
        self.assertEqual(report.failed, frozenset({"alice@example.org"}))

    def test_failed_with_a_success_status_or_none(self) -> None:
        """C{Action: failed} with a 2.x.x status, or none that parses, is not counted."""
        for code in ("2.0.0", "bogus"):
            self.assertEqual(classify(dsn("alice@example.org", status=code)).failed, frozenset())

    def test_delivered_and_relayed(self) -> None:
        """Success notices (C{delivered}, C{relayed}, C{expanded}) report no failure."""
        for action in ("delivered", "relayed", "expanded"):
            report = classify(dsn("alice@example.org", action=action, status="2.0.0"))
            self.assertEqual(report, FailureReport("dsn", frozenset(), "no failed recipient"))

    def test_original_recipient(self) -> None:
        """
        Mail forwarded on: the Final-Recipient is another address, the
        C{Original-Recipient} (the sender's ORCPT) is the member's.
        """
        report = classify(dsn("alice@forwarded.example.net", original="alice@example.org"))
        self.assertIn("alice@example.org", report.failed)

    def test_gsmail_own_dsn(self) -> None:
        """The DSN gsmail itself sends when a member's server refuses the mail is a failure."""
        path = self.mktemp()
        with open(path, "wb") as f:
            f.write(b"Subject: post\n\nbody\n")
        message = build_dsn(
            reporting_mta="mx.groups.example.com",
            original_sender="dev+alice=example.org@groups.example.com",
            recipients=[
                FailedRecipient("alice@example.org", status.Reply(550, "5.1.1", "No"), "mx")
            ],
            original_path=path,
            arrival=NOW,
            now=NOW,
        )
        self.assertEqual(classify(message).failed, frozenset({"alice@example.org"}))

    def test_base64_delivery_status(self) -> None:
        """A delivery-status part in base64 (Exchange does this) is read."""
        report = b"Final-Recipient: rfc822;alice@example.org\r\nAction: failed\r\nStatus: 5.2.2\r\n"
        message = (
            b"From: postmaster@example.org\nTo: x@groups.example.com\nSubject: Undeliverable\n"
            b"MIME-Version: 1.0\n"
            b'Content-Type: multipart/report; report-type=delivery-status; boundary="b"\n\n'
            b"--b\nContent-Type: text/plain\n\nMailbox full.\n"
            b"--b\nContent-Type: message/delivery-status\nContent-Transfer-Encoding: base64\n\n"
            + base64.encodebytes(b"Reporting-MTA: dns;ex.example.org\r\n\r\n" + report)
            + b"--b--\n"
        )
        self.assertEqual(classify(message).failed, frozenset({"alice@example.org"}))

    def test_qmail(self) -> None:
        """A qmail bounce (plain text): flufl.bounce's detector finds the member."""
        self.assertEqual(
            classify(qmail_bounce("alice@example.org")),
            FailureReport("detector", frozenset({"alice@example.org"})),
        )

    def test_old_exim(self) -> None:
        """An old Exim bounce (plain text with X-Failed-Recipients): the member is found."""
        self.assertEqual(classify(EXIM_PLAIN).failed, frozenset({"alice@example.org"}))

    def test_out_of_office(self) -> None:
        """A vacation reply naming the member is no failure report."""
        self.assertEqual(
            classify(out_of_office()), FailureReport("none", frozenset(), "auto-reply")
        )

    def test_plain_mail(self) -> None:
        """Plain mail that says "550 user unknown" is no failure report."""
        self.assertEqual(
            classify(plain_mail()), FailureReport("none", frozenset(), "not a failure report")
        )

    def test_malformed(self) -> None:
        """
        Messages flufl.bounce's detectors trip over (no From:), and garbage,
        report nothing and raise nothing.
        """
        for message in (
            b"Subject: x\n\n" + b"a" * 75 + b"\n",
            b"",
            b"\x00\xff" * 1000,
            b"Content-Type: multipart/report; boundary=\n\n--\n--\n",
        ):
            self.assertEqual(classify(message).failed, frozenset(), message[:20])


class ReadHeadTests(SynchronousTestCase):
    """Only the head of a message is read."""

    def test_large_message_head_only(self) -> None:
        """
        A 2 MiB message to a bounce address (the report first, then the
        returned original) is read up to L{MAX_SCANNED} bytes from its spool
        file, and its report is found.
        """
        data = dsn("alice@example.org") + b"x" * 75 + b"\n" * (2 * 1024 * 1024 // 76)
        data += b"y" * (2 * 1024 * 1024 - len(data))
        message = source(data, self._dir(), in_memory=False)
        head = read_head(message)
        self.assertEqual(len(head), MAX_SCANNED)
        self.assertEqual(classify(head).failed, frozenset({"alice@example.org"}))

    def test_in_memory(self) -> None:
        """A message the spool kept in memory is read from there, not from the file."""
        message = MessageSource(prefix=b"", path="/nonexistent", size=3, data=b"abc")
        self.assertEqual(read_head(message), b"abc")

    def _dir(self) -> str:
        directory = self.mktemp()
        os.makedirs(directory)
        return directory


class ScreenTests(SynchronousTestCase):
    """L{BounceScreen.check}: the address's check, then the message."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(NOW)
        self.verp = VerpPolicy(self.clock, unsigned_until=None, keys=VerpKeys((KEY,), NOW))
        self.screen = BounceScreen(self.verp, self.clock)
        self.directory = self.mktemp()
        os.makedirs(self.directory)
        self.events: list[LogEvent] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def route(self, member: Address = ALICE) -> Route:
        route = self.verp.route(self.verp.sender(GROUP, member))
        assert route is not None
        return route

    def check(self, route: Route, data: bytes) -> status.Reply | Address:
        result: status.Reply | Address = self.successResultOf(
            self.screen.check(route, source(data, self.directory))
        )
        return result

    def test_parsed_in_the_blocking_runner(self) -> None:
        """
        With a thread runner, the message is read and parsed there (not in
        the reactor thread); the address alone is judged at once.
        """
        ran: list[object] = []
        pending: list[Deferred[FailureReport]] = []

        def blocking(f: Callable[[], FailureReport]) -> Deferred[FailureReport]:
            ran.append(f)
            d: Deferred[FailureReport] = Deferred()
            pending.append(d)
            d.callback(f())
            return d

        self.screen = BounceScreen(self.verp, self.clock, blocking)
        self.assertEqual(self.check(self.route(), dsn("alice@example.org")), ALICE)
        self.assertEqual(len(ran), 1)
        forged = Route(
            RouteKind.BOUNCE, ALICE, group_address=GROUP, bounce_check=BounceCheck.BAD_TAG
        )
        self.assertEqual(self.check(forged, dsn("alice@example.org")), status.BOUNCE_NOT_OURS)
        self.assertEqual(len(ran), 1)

    def test_unreadable_spool_file(self) -> None:
        """A spool file that cannot be read fails the check with OSError (451 4.3.0)."""
        message = MessageSource(prefix=b"", path=self.directory + "/gone", size=10, data=None)
        self.failureResultOf(self.screen.check(self.route(), message), OSError)

    def logged(self) -> list[str]:
        return [formatEvent(e) for e in self.events if e.get("log_namespace") == "gsmail.bounces"]

    def test_signed_failure(self) -> None:
        """A valid tag and a failure report for its member: the member."""
        self.assertEqual(self.check(self.route(), dsn("alice@example.org")), ALICE)

    def test_signed_not_failures(self) -> None:
        """A valid tag with a delay notice, an auto-reply or plain mail: not recorded (2.0.0)."""
        for data in (
            dsn("alice@example.org", action="delayed", status="4.4.1"),
            out_of_office(),
            plain_mail(),
            dsn("bob@example.org"),
        ):
            self.assertEqual(self.check(self.route(), data), status.BOUNCE_NOT_FAILURE)

    def test_addresses_not_recorded(self) -> None:
        """
        A forged tag, an expired one, an unsigned address after the window
        or of no group: C{250 2.0.0 Not recorded: not a current bounce
        address}, whatever the message (one text for all: no oracle).
        """
        route = self.route()
        for check in (
            BounceCheck.BAD_TAG,
            BounceCheck.EXPIRED,
            BounceCheck.UNSIGNED_LATE,
            BounceCheck.UNKNOWN_GROUP,
        ):
            forged = Route(
                RouteKind.BOUNCE,
                route.recipient,
                group_address=GROUP,
                member_address=ALICE,
                bounce_check=check,
            )
            self.assertEqual(self.check(forged, dsn("alice@example.org")), status.BOUNCE_NOT_OURS)

    def test_no_key(self) -> None:
        """A signed address smtp2gs cannot check (key file unreadable): 451 4.3.5, retried."""
        route = Route(RouteKind.BOUNCE, ALICE, group_address=GROUP, bounce_check=BounceCheck.NO_KEY)
        reply = self.check(route, dsn("alice@example.org"))
        assert isinstance(reply, status.Reply)
        self.assertEqual((reply.code, reply.enhanced), (451, "4.3.5"))

    def test_short_form(self) -> None:
        """
        A short address: the member is the reported address the tag was made
        for; a report of others only is not recorded.
        """
        member = Address("a.very.long.first.name.and.last.name", "a-long-domain.example.org")
        route = self.route(member)
        self.assertEqual(route.bounce_check, BounceCheck.SIGNED_SHORT)
        self.assertEqual(self.check(route, dsn(str(member))), member)
        self.assertEqual(self.check(route, dsn("alice@example.org")), status.BOUNCE_NOT_OURS)
        self.assertEqual(self.check(route, out_of_office()), status.BOUNCE_NOT_FAILURE)

    def test_logged_once_per_burst(self) -> None:
        """
        Drops are logged once per burst: the first, then nothing for a
        minute, then the next with the number left out.
        """
        forged = Route(
            RouteKind.BOUNCE,
            Address("dev+alice=example.org=aaaaaaaaaaa", "groups.example.com"),
            group_address=GROUP,
            member_address=ALICE,
            bounce_check=BounceCheck.BAD_TAG,
        )
        for _ in range(5):
            self.check(forged, plain_mail())
        self.assertEqual(len(self.logged()), 1)
        self.assertIn("not recorded: bad-tag", self.logged()[0])
        self.clock.advance(61)
        self.check(forged, plain_mail())
        self.assertEqual(len(self.logged()), 2)
        self.assertIn("4 more like it", self.logged()[1])
        # Another reason has its own burst.
        self.check(self.route(), plain_mail())
        self.assertEqual(len(self.logged()), 3)
        self.assertIn("not a failure report", self.logged()[2])

    def test_expired_in_practice(self) -> None:
        """An address made 15 days ago is expired when its bounce comes."""
        route = self.route()
        self.clock.advance(15 * DAY)
        late = self.verp.route(route.recipient)
        assert late is not None
        self.assertEqual(late.bounce_check, BounceCheck.EXPIRED)
        self.assertEqual(self.check(late, dsn("alice@example.org")), status.BOUNCE_NOT_OURS)
