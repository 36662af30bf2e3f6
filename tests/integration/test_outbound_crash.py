# -*- test-case-name: tests.integration.test_outbound_crash -*-
"""
Crash safety of the outbound queue, with the real command: C{twistd -n
gsmail} (its own process) takes one message for 1,000 recipients with XVERP
on its submission listener and relays it, one transaction per recipient, to
a smarthost in this test process that answers each final dot after 5 ms.
Once about 300 recipients have arrived, gsmail is killed with SIGKILL and
started again on the same queue directory. Every recipient must arrive.

A recipient may arrive twice: the smarthost took it (the test counts it when
the final dot arrives), but gsmail died before it read the reply or before
its record of the recipient reached the disk. That is the at-least-once
window SMTP cannot close; gsmail keeps it to the transactions in flight (at
most C{destination_concurrency}, since each worker records a transaction
before starting the next), so the test allows twice that many.
"""

from __future__ import annotations

import os
import signal
import socket
from collections import Counter

from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.logger import Logger
from twisted.trial.unittest import TestCase

from gsmail.addresses import parse_mailbox
from gsmail.outbound.queue import read_queue
from gsmail.verp import parse_verp
from tests.integration.mx import GROUP, ScriptedCore, message, receiver, stop_receivers, submit
from tests.util import Child, eventually, free_port, spawn_gsmail

log = Logger()

RECIPIENTS = [f"m{i:04d}@members.test" for i in range(1000)]
#: Recipients the smarthost must have seen before gsmail is killed.
KILL_AT = 300
CONCURRENCY = 4


def port_open(port: int) -> bool:
    """Does something accept connections on 127.0.0.1:C{port}? (Blocking.)"""
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True


class CrashRecoveryTests(TestCase):
    """SIGKILL in the middle of a delivery loses no recipient."""

    timeout = 180

    def write_config(self, directory: str, submission_port: int, relay_port: int) -> str:
        path = os.path.join(directory, "gsconfig.ini")
        with open(path, "w") as f:
            f.write(
                "[webservice-default]\ntoken = crash-test-token\n"
                "[gsmail-default]\nurl = embedded\n"
                "lmtp_endpoint = tcp:0:interface=127.0.0.1\n"
                f"submission_endpoint = tcp:{submission_port}:interface=127.0.0.1\n"
                f"relayhost = [127.0.0.1]:{relay_port}\n"
                # Never asked: the relay host is an address.
                "dns_servers = 127.0.0.1:9\n"
                f"destination_concurrency = {CONCURRENCY}\n"
                "max_recipients = 1000\n"
                "hostname = mx.groups.example.com\ndomains = groups.example.com\n"
                "standin_groups = example\nledger_path = ledger/posted.log\n"
                "spool_dir = spool\nstandin_dir = standin\nqueue_dir = queue\n"
            )
        return path

    async def start_gsmail(self, directory: str, config: str, port: int) -> Child:
        """Run C{twistd -n gsmail}; fire once its submission port accepts connections."""
        child = await spawn_gsmail(self, directory, config, signal.SIGKILL)
        deadline = reactor.seconds() + 30
        while not await deferToThread(port_open, port):
            if child.ended.called or reactor.seconds() > deadline:
                self.fail("gsmail did not start:\n" + child.output)
            await deferLater(reactor, 0.1)
        return child

    async def test_sigkill_mid_delivery(self) -> None:
        """
        gsmail killed with SIGKILL while relaying a message to 1,000
        recipients delivers every one of them once it is started again, and
        at most a few (those in flight at the kill) twice.
        """
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        core = ScriptedCore(delay=0.005)
        factory = receiver(core, directory)
        relay = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(stop_receivers, [relay], [factory])
        submission_port = free_port()
        config = self.write_config(directory, submission_port, relay.getHost().port)

        child = await self.start_gsmail(directory, config, submission_port)
        await deferToThread(
            submit, submission_port, GROUP, RECIPIENTS, message("crash"), xverp=True
        )
        # Poll often: the kill should land mid-delivery, near KILL_AT.
        await eventually(
            lambda: len(core.recipients()) >= KILL_AT,
            f"{KILL_AT} recipients at the smarthost",
            timeout=60,
        )
        child.signal(signal.SIGKILL)
        await child.ended
        at_kill = len(set(core.recipients()))
        self.assertLess(at_kill, len(RECIPIENTS), "the kill came after the whole delivery")

        child = await self.start_gsmail(directory, config, submission_port)
        await eventually(
            lambda: set(core.recipients()) >= set(RECIPIENTS),
            "every recipient at the smarthost",
            timeout=90,
        )
        await eventually(
            lambda: not read_queue(os.path.join(directory, "queue")), "the queue to empty"
        )
        child.signal(signal.SIGTERM)
        await child.ended

        received = core.recipients()
        duplicates = len(received) - len(set(received))
        log.info(
            "Crash test: {at_kill} recipients before SIGKILL, {duplicates} duplicates",
            at_kill=at_kill,
            duplicates=duplicates,
        )
        self.assertEqual(set(received), set(RECIPIENTS))
        self.assertLessEqual(
            duplicates,
            2 * CONCURRENCY,
            f"delivered twice: {sorted(r for r, n in Counter(received).items() if n > 1)}",
        )
        for transaction in core.received:
            [recipient] = transaction.recipients
            # A signed VERP sender (gsmail.verp) for that member.
            verp = parse_verp(parse_mailbox(transaction.sender))
            assert verp is not None, transaction.sender
            self.assertEqual((str(verp.group), str(verp.member)), (GROUP, recipient))
            self.assertIsNotNone(verp.tag)
            self.assertIn(b"Subject: crash\n", transaction.data)
