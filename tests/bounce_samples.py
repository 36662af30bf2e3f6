"""
Messages that arrive at bounce addresses, written for gsmail's tests in the
formats real MTAs use (RFC 3464 reports as Postfix, Exim and Exchange send
them; qmail's and old Exim's plain-text bounces; vacation replies), LF line
endings as gsmail spools them. Every address and host is made up.
"""

from __future__ import annotations


def dsn(
    recipient: str,
    *,
    action: str = "failed",
    status: str = "5.1.1",
    original: str | None = None,
    to: str = "dev+alice=example.org@groups.example.com",
    reporting_mta: str = "mx.example.org",
    diagnostic: str = "smtp; 550 5.1.1 <{recipient}>: Recipient address rejected: User unknown",
) -> bytes:
    """
    An RFC 3464 report as Postfix writes one: C{multipart/report;
    report-type=delivery-status} with the human part, the delivery-status
    part (one per-recipient block) and the returned headers.
    """
    boundary = "8C2E51A0F3.1700000000/mx.example.org"
    original_line = f"Original-Recipient: rfc822;{original}\n" if original else ""
    subject = (
        "Delayed Mail (still being retried)"
        if action == "delayed"
        else ("Undelivered Mail Returned to Sender")
    )
    return (
        f"Received: by {reporting_mta} (Postfix) id 8C2E51A0F3; Tue, 14 Nov 2023 22:13:20 +0000\n"
        f"Date: Tue, 14 Nov 2023 22:13:20 +0000 (UTC)\n"
        f"From: MAILER-DAEMON@{reporting_mta} (Mail Delivery System)\n"
        f"Subject: {subject}\n"
        f"To: {to}\n"
        f"Auto-Submitted: auto-replied\n"
        f"MIME-Version: 1.0\n"
        f"Content-Type: multipart/report; report-type=delivery-status;\n"
        f'\tboundary="{boundary}"\n'
        f"Content-Transfer-Encoding: 7bit\n"
        f"Message-Id: <20231114221320.8C2E51A0F3@{reporting_mta}>\n"
        f"\n"
        f"This is a MIME-encapsulated message.\n"
        f"\n"
        f"--{boundary}\n"
        f"Content-Description: Notification\n"
        f"Content-Type: text/plain; charset=us-ascii\n"
        f"\n"
        f"This is the mail system at host {reporting_mta}.\n"
        f"\n"
        f"I'm sorry to have to inform you that your message could not\n"
        f"be delivered to one or more recipients.\n"
        f"\n"
        f"<{recipient}>: host mail.example.org said: 550 5.1.1 User unknown\n"
        f"\n"
        f"--{boundary}\n"
        f"Content-Description: Delivery report\n"
        f"Content-Type: message/delivery-status\n"
        f"\n"
        f"Reporting-MTA: dns; {reporting_mta}\n"
        f"X-Postfix-Queue-ID: 8C2E51A0F3\n"
        f"X-Postfix-Sender: rfc822; {to}\n"
        f"Arrival-Date: Tue, 14 Nov 2023 22:13:19 +0000 (UTC)\n"
        f"\n"
        f"Final-Recipient: rfc822; {recipient}\n"
        f"{original_line}"
        f"Action: {action}\n"
        f"Status: {status}\n"
        f"Remote-MTA: dns; mail.example.org\n"
        f"Diagnostic-Code: {diagnostic.format(recipient=recipient)}\n"
        f"\n"
        f"--{boundary}\n"
        f"Content-Description: Undelivered Message Headers\n"
        f"Content-Type: text/rfc822-headers\n"
        f"\n"
        f"From: dev@groups.example.com\n"
        f"To: dev@groups.example.com\n"
        f"Subject: Minutes of the meeting\n"
        f"Message-ID: <post.1@groups.example.com>\n"
        f"\n"
        f"--{boundary}--\n"
    ).encode()


def qmail_bounce(recipient: str, to: str = "dev+alice=example.org@groups.example.com") -> bytes:
    """A plain-text bounce as qmail-send writes it (no RFC 3464 report)."""
    return (
        "Date: 14 Nov 2023 22:13:20 -0000\n"
        "From: MAILER-DAEMON@mail.example.org\n"
        f"To: {to}\n"
        "Subject: failure notice\n"
        "\n"
        "Hi. This is the qmail-send program at mail.example.org.\n"
        "I'm afraid I wasn't able to deliver your message to the following addresses.\n"
        "This is a permanent error; I've given up. Sorry it didn't work out.\n"
        "\n"
        f"<{recipient}>:\n"
        "Sorry, no mailbox here by that name. (#5.1.1)\n"
        "\n"
        "--- Below this line is a copy of the message.\n"
        "\n"
        "From: dev@groups.example.com\n"
        "Subject: Minutes of the meeting\n"
        "\n"
        "The minutes.\n"
    ).encode()


def out_of_office(to: str = "dev+alice=example.org@groups.example.com") -> bytes:
    """A vacation reply (RFC 3834) that mentions the member's address."""
    return (
        "From: Alice <alice@example.org>\n"
        f"To: {to}\n"
        "Subject: Out of office: Minutes of the meeting\n"
        "Auto-Submitted: auto-replied\n"
        "X-Autoreply: yes\n"
        "Date: Tue, 14 Nov 2023 22:13:20 +0000\n"
        "\n"
        "I am away until Monday with no access to alice@example.org.\n"
        "Your message was not delivered to me today; I will read it later.\n"
    ).encode()


def plain_mail(to: str = "dev+alice=example.org@groups.example.com") -> bytes:
    """What a forger sends: any mail, no report."""
    return (
        "From: Mallory <mallory@example.net>\n"
        f"To: {to}\n"
        "Subject: unsubscribe alice@example.org\n"
        "\n"
        "550 5.1.1 alice@example.org: user unknown\n"
    ).encode()
