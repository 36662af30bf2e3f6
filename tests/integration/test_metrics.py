# -*- test-case-name: tests.integration.test_metrics -*-
"""
The metrics endpoint end to end: gsmail on real sockets (in this process,
and as C{twistd -n gsmail}), mail sent with smtplib, C{/metrics} scraped and
parsed with prometheus_client's parser, C{/readyz} with GroupServer up and
down.
"""

from __future__ import annotations

import os
import smtplib
import urllib.error
import urllib.request

from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from tests.integration.clients import CLIENT_TIMEOUT, EXAMPLE, SENDER, UNKNOWN_GROUP, make_message
from tests.util import (
    TOKEN,
    Child,
    free_port,
    make_config,
    port_of,
    spawn_gsmail,
    start_service,
    wait_for,
)

#: The longest any one wait lasts (seconds).
WAIT = 30.0


def get(url: str) -> tuple[int, str]:
    """GET C{url} (blocking): the status and the body."""
    try:
        with urllib.request.urlopen(url, timeout=CLIENT_TIMEOUT) as response:
            return response.status, response.read().decode("utf-8")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode("utf-8")


def send(port: int, message_id: str) -> dict[str, object]:
    """One message to the C{example} group over ESMTP (blocking)."""
    with smtplib.SMTP("127.0.0.1", port, timeout=CLIENT_TIMEOUT) as client:
        return dict(client.sendmail(SENDER, [EXAMPLE], make_message(message_id)))


def send_two(port: int, message_id: str) -> dict[str, object]:
    """One message to an unknown group (refused at RCPT) and C{example} (blocking)."""
    with smtplib.SMTP("127.0.0.1", port, timeout=CLIENT_TIMEOUT) as client:
        return dict(client.sendmail(SENDER, [UNKNOWN_GROUP, EXAMPLE], make_message(message_id)))


async def scraped_until(
    url: str, want: dict[tuple[str, tuple[tuple[str, str], ...]], float]
) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """
    Scrape C{url} until every sample of C{want} has its value (log lines of
    workers arrive up to 0.1 s late, disconnects after the reply to QUIT);
    at most L{WAIT} seconds.
    """
    deadline = reactor.seconds() + WAIT  # type: ignore[attr-defined]
    while True:
        found = scrape((await deferToThread(get, url))[1])
        if all(found.get(key) == v for key, v in want.items()):
            return found
        if reactor.seconds() > deadline:  # type: ignore[attr-defined]
            wrong = {key: found.get(key) for key, v in want.items() if found.get(key) != v}
            raise AssertionError(f"after {WAIT:g} s, still {wrong}")
        await deferLater(reactor, 0.1)  # type: ignore[arg-type]


def scrape(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of an exposition, parsed by prometheus_client."""
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


class InProcessTests(TestCase):
    """The service in this process, on the real reactor."""

    timeout = 60

    async def test_scrape_and_readyz(self) -> None:
        """
        After a message, C{/metrics} has the GroupServer requests, the
        ledger record and the post slots; C{/healthz} and C{/readyz} answer
        200; with the stand-in stopped, C{/readyz} is 503 naming GroupServer.
        """
        config = make_config(
            os.path.abspath(self.mktemp()), metrics_endpoint="tcp:0:interface=127.0.0.1"
        )
        service = start_service(self, config)
        base = f"http://127.0.0.1:{port_of(service, 'metrics')}"
        self.assertEqual(await deferToThread(send, port_of(service, "smtp"), "m1@example.org"), {})
        code, text = await deferToThread(get, base + "/metrics")
        self.assertEqual(code, 200)
        found = scrape(text)
        requests = {
            labels: v
            for (name, labels), v in found.items()
            if name == "gsmail_groupserver_request_seconds_count"
        }
        self.assertEqual(requests.get((("page", "add"), ("result", "200"))), 1)
        self.assertGreaterEqual(requests.get((("page", "exists"), ("result", "200")), 0), 1)
        self.assertEqual(found[("gsmail_ledger_records", ())], 1)
        self.assertEqual(found[("gsmail_ledger_append_seconds_count", ())], 1)
        self.assertEqual(found[("gsmail_posts_in_flight", ())], 0)
        self.assertIn(("gsmail_disk_free_bytes", (("directory", "spool"),)), found)

        self.assertEqual(await deferToThread(get, base + "/healthz"), (200, "ok\n"))
        self.assertEqual(await deferToThread(get, base + "/readyz"), (200, "ready\n"))

        assert service.readiness is not None and service.readiness.probe is not None
        service.readiness.probe.ttl = 0.0  # no cached answer
        await service._standin_port.stopListening()
        service._standin_port = None
        await service.client.close()  # and its kept-alive connections
        code, body = await deferToThread(get, base + "/readyz")
        self.assertEqual(code, 503, body)
        self.assertRegex(body, r"(?m)^groupserver: .* does not answer")
        self.assertEqual(len(body.splitlines()), 1, body)

    async def test_mail_counters(self) -> None:
        """
        A session with one recipient refused and one delivered is counted
        from the mail log events: session, message, bytes, recipient, reject.
        """
        config = make_config(
            os.path.abspath(self.mktemp()), metrics_endpoint="tcp:0:interface=127.0.0.1"
        )
        service = start_service(self, config)
        url = f"http://127.0.0.1:{port_of(service, 'metrics')}/metrics"
        refused = await deferToThread(send_two, port_of(service, "smtp"), "m2@example.org")
        self.assertEqual(list(refused), [UNKNOWN_GROUP])
        smtp = (("listener", "smtp"),)
        found = await scraped_until(
            url,
            {
                ("gsmail_sessions_total", smtp): 1,
                ("gsmail_sessions_open", smtp): 0,
                ("gsmail_messages_total", smtp): 1,
                (
                    "gsmail_recipients_total",
                    (("class", "2xx"), ("listener", "smtp"), ("status", "sent")),
                ): 1,
                (
                    "gsmail_rejects_total",
                    (("class", "5xx"), ("listener", "smtp"), ("stage", "RCPT")),
                ): 1,
            },
        )
        self.assertGreater(found[("gsmail_bytes_received_total", smtp)], 100)
        self.assertEqual(found[("gsmail_delivery_delay_seconds_count", smtp)], 1)
        self.assertEqual(found.get(("gsmail_log_events_unreadable_total", ())), 0)

    def test_port_in_use(self) -> None:
        """A metrics port in use stops the start with one line naming the option."""
        import socket

        from gsmail.service import makeService
        from gsmail.startup import StartupError

        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen(1)
            port = taken.getsockname()[1]
            config = make_config(
                os.path.abspath(self.mktemp()),
                metrics_endpoint=f"tcp:{port}:interface=127.0.0.1",
            )
            service = makeService(config, reactor)
            error = self.assertRaises(StartupError, service.privilegedStartService)
        self.assertTrue(
            str(error).startswith(
                f"metrics_endpoint 'tcp:{port}:interface=127.0.0.1': cannot listen"
            ),
            str(error),
        )
        for listener in service.listeners.values():  # those bound before it
            listener._waitingForPort.addCallback(lambda p: p.stopListening())

    async def test_off_by_default(self) -> None:
        """Without C{metrics_endpoint} nothing listens and no observer is added."""
        service = start_service(self, make_config(os.path.abspath(self.mktemp())))
        self.assertIsNone(service.metrics)
        self.assertRaises(KeyError, service.getServiceNamed, "metrics")


class TwistdTests(TestCase):
    """C{twistd -n gsmail} with C{metrics_endpoint}, as an operator runs it."""

    timeout = 120

    async def start(self, url: str, smtp_port: int, metrics_port: int, more: str = "") -> Child:
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        config = os.path.join(directory, "gsconfig.ini")
        with open(config, "w") as f:
            f.write(
                f"[webservice-default]\ntoken = {TOKEN}\n[gsmail-default]\nurl = {url}\n"
                f"smtp_endpoint = tcp:{smtp_port}:interface=127.0.0.1\n"
                "domains = groups.example.com\nstandin_groups = example\n"
                "ledger_path = ledger/posted.log\nspool_dir = spool\nstandin_dir = standin\n"
                "postmaster_maildir = postmaster\nroute_state_dir = routes\n"
                "errors_dir = errors\nrejected_dir = rejected\nconnect_timeout = 2\n"
                f"metrics_endpoint = tcp:{metrics_port}:interface=127.0.0.1\n" + more
            )
        child = await spawn_gsmail(self, directory, config)
        await wait_for(child, "Metrics, /healthz and /readyz on", WAIT)
        return child

    async def test_workers_counted_once(self) -> None:
        """
        With two inbound worker processes, each message and session they
        take is counted once, by the main process, from their relayed log
        events; their GroupServer requests, ledger appends and post gauges
        reach the main process's scrape in their snapshots (every
        C{PUSH_INTERVAL} seconds), summed, and are not written to the log.
        """
        smtp_port, metrics_port = free_port(), free_port()
        child = await self.start("embedded", smtp_port, metrics_port, "inbound_workers = 2\n")
        for n in range(6):
            self.assertEqual(await deferToThread(send, smtp_port, f"w{n}@example.org"), {})
        smtp = (("listener", "smtp"),)
        found = await scraped_until(
            f"http://127.0.0.1:{metrics_port}/metrics",
            {
                ("gsmail_sessions_total", smtp): 6,
                ("gsmail_sessions_open", smtp): 0,
                ("gsmail_messages_total", smtp): 6,
                (
                    "gsmail_recipients_total",
                    (("class", "2xx"), ("listener", "smtp"), ("status", "sent")),
                ): 6,
                # The main process posts none of them: these are the workers'.
                (
                    "gsmail_groupserver_request_seconds_count",
                    (("page", "add"), ("result", "200")),
                ): 6,
                ("gsmail_posts_in_flight", ()): 0,
                ("gsmail_posts_waiting", ()): 0,
            },
        )
        self.assertEqual(
            found[
                (
                    "gsmail_groupserver_request_seconds_bucket",
                    (("le", "+Inf"), ("page", "add"), ("result", "200")),
                )
            ],
            6,
        )
        self.assertGreater(
            found[("gsmail_groupserver_request_seconds_sum", (("page", "add"), ("result", "200")))],
            0,
        )
        self.assertGreaterEqual(found[("gsmail_ledger_append_seconds_count", ())], 1)
        self.assertGreaterEqual(found[("gsmail_ledger_records", ())], 1)
        self.assertEqual(found.get(("gsmail_log_events_unreadable_total", ())), 0)
        # The snapshots are not log lines.
        self.assertIn("Inbound worker 2", child.output)
        self.assertNotIn("ledger_append", child.output)

    async def test_scrape(self) -> None:
        """
        Mail sent to a twistd gsmail shows in a scrape parsed by
        prometheus_client; C{/readyz} is 200 with the embedded stand-in.
        """
        smtp_port, metrics_port = free_port(), free_port()
        child = await self.start("embedded", smtp_port, metrics_port)
        self.assertIn(f"on http://127.0.0.1:{metrics_port}", child.output)
        base = f"http://127.0.0.1:{metrics_port}"
        for n in range(3):
            self.assertEqual(await deferToThread(send, smtp_port, f"t{n}@example.org"), {})
        code, text = await deferToThread(get, base + "/metrics")
        self.assertEqual(code, 200)
        found = scrape(text)
        self.assertEqual(
            found[
                ("gsmail_groupserver_request_seconds_count", (("page", "add"), ("result", "200")))
            ],
            3,
        )
        self.assertEqual(found[("gsmail_ledger_records", ())], 3)
        self.assertEqual(await deferToThread(get, base + "/readyz"), (200, "ready\n"))
        self.assertEqual(
            scrape((await deferToThread(get, base + "/metrics"))[1])[("gsmail_ready", ())], 1
        )

    async def test_readyz_groupserver_down(self) -> None:
        """With GroupServer's URL on a closed port, C{/readyz} is 503 naming GroupServer."""
        smtp_port, metrics_port, closed = free_port(), free_port(), free_port()
        await self.start(f"http://127.0.0.1:{closed}", smtp_port, metrics_port)
        base = f"http://127.0.0.1:{metrics_port}"
        self.assertEqual(await deferToThread(get, base + "/healthz"), (200, "ok\n"))
        code, body = await deferToThread(get, base + "/readyz")
        self.assertEqual(code, 503, body)
        self.assertRegex(body, rf"(?m)^groupserver: .*127\.0\.0\.1:{closed}.* does not answer")
        self.assertNotIn(TOKEN, body)
        code, text = await deferToThread(get, base + "/metrics")
        self.assertEqual((code, scrape(text)[("gsmail_ready", ())]), (200, 0))
