# -*- test-case-name: tests.outbound.test_delivery -*-
"""
The outbound delivery's conversation with a destination, one attempt at a
time: the hosts to try (smarthost, or MX hosts under any MTA-STS policy),
the connection with its TLS and AUTH, each job's transaction (parameters,
VERP split when a smarthost lacks XVERP, pipelining the next job), the
replies handed to the bookkeeping, and delivery to this site's own domains.

Not here: which recipients are due and how many connections run
(L{gsmail.outbound.delivery}), what is done with the replies
(L{gsmail.outbound.delivery.outcomes}), the SMTP client itself
(L{gsmail.outbound.client}).
"""

from __future__ import annotations

import ipaddress
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import attrs
from twisted.internet import ssl
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import wrapClientTLS
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.logger import Logger

from gsmail import maillog, status
from gsmail.outbound import dsn
from gsmail.outbound.client import (
    CHUNK_SIZE,
    ClientTLS,
    SMTPClientError,
    Timeouts,
    Transaction,
    connect,
)
from gsmail.outbound.delivery.tls import TLSPolicy
from gsmail.outbound.mtasts import ENFORCE, MTASTS, NONE, Policy, STSClientTLS
from gsmail.outbound.mx import MXHost, MXLookupError, MXResolver, RelayHost
from gsmail.outbound.queue import PENDING, Envelope, RecipientState
from gsmail.status import Reply

if TYPE_CHECKING:
    from gsmail.outbound.queue import OutboundQueue

#: The delivery's log namespace, as before the split (log lines unchanged).
log = Logger(namespace="gsmail.outbound.delivery")

#: Small messages kept in memory while they are delivered (oldest dropped).
_MESSAGES_KEPT = 16


def _error_reply(error: SMTPClientError) -> Reply:
    """
    The reply to record for a failed connection or transaction: a transient
    error is a 4xx whatever the server said (a 535 from a smarthost with a
    wrong password, a 250 before the end of data), so the mail stays queued.
    """
    reply = error.as_reply()
    if error.transient and not reply.is_transient:
        enhanced = "4" + reply.enhanced[1:] if reply.enhanced else "4.0.0"
        return Reply(451, enhanced, reply.text)
    return reply


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


@attrs.define
class _Job:
    """One transaction to make: some pending recipients of one envelope."""

    envelope: Envelope
    recipients: list[RecipientState]
    sender: str
    #: Ask the smarthost to do the VERP (Postfix's XVERP) for this batch;
    #: split per recipient if it turns out not to offer XVERP.
    xverp: bool = False
    #: Its transaction, once made (L{_Sessions._transaction}).
    transaction: Transaction | None = None
    #: The sender and recipients are known to be mailboxes (L{Transaction.checked}).
    checked: bool = False
    #: When this attempt began (the reactor's seconds), for C{delays=}.
    made: float = 0.0


class _Sessions:
    """
    The sessions to a destination: a part of
    L{gsmail.outbound.delivery.OutboundDelivery} (a mixin), which sets the
    attributes and defines the methods declared here.
    """

    if TYPE_CHECKING:
        queue: OutboundQueue
        reactor: Any
        hostname: str
        relayhost: RelayHost | None
        mx: MXResolver | None
        smarthost_tls: TLSPolicy
        mx_tls: TLSPolicy
        auth: tuple[str, str] | None
        timeouts: Timeouts
        local_delivery: Callable[[str, str, str], Deferred[Reply]] | None
        mx_port: int
        trace: bool
        mta_sts: MTASTS | None
        transactions: int
        _endpoint_factory: Callable[[str, int], IStreamClientEndpoint]
        _in_flight: set[tuple[str, str]]
        _waiting: set[str]
        _messages: dict[str, bytes]
        _made: dict[str, tuple[str, dict[str, str | None], dict[str, str | None]]]

        def _wake_at(self, queue_id: str, when: float) -> None: ...
        async def _park(self, destination: str) -> bool: ...
        def _verp_sender(self, sender: str, recipient: str) -> str: ...
        async def _record(
            self,
            job: _Job,
            replies: dict[str, Reply],
            remote: str,
            *,
            next_hop_reports: bool = False,
            final: bool = False,
        ) -> None: ...
        def _sts_hosts(self, domain: str, sts: Policy, hosts: list[MXHost]) -> list[MXHost]: ...
        def _sts_connected(
            self, domain: str, sts: Policy, tls: STSClientTLS, encrypted: bool
        ) -> None: ...
        def _sts_refused(
            self, domain: str, sts: Policy, tls: STSClientTLS, error: SMTPClientError, reply: Reply
        ) -> Reply: ...

    async def _hosts(self, destination: str) -> list[MXHost]:
        if destination == "relay:":
            assert self.relayhost is not None
            host = self.relayhost.host
            if self.mx is None or _is_ip(host):
                return [MXHost(0, host, (host,))]
            return await self.mx.relay_hosts(self.relayhost)
        assert self.mx is not None
        return await self.mx.hosts(destination[3:])

    async def _session(self, destination: str, jobs: deque[_Job]) -> None:
        """One connection: try the hosts in order, then send jobs over it."""
        try:
            hosts = await self._hosts(destination)
        except MXLookupError as e:
            self._fail_all(jobs, e.reply)
            return
        except Exception:
            log.failure("Looking up the hosts for {destination} failed", destination=destination)
            self._fail_all(jobs, status.LOCAL_ERROR)
            return
        smarthost = destination == "relay:"
        policy = self.smarthost_tls if smarthost else self.mx_tls
        port = self.relayhost.port if smarthost and self.relayhost else self.mx_port
        last_error: Reply = Reply(451, "4.4.1", "No host could be reached")
        sts: Policy | None = None
        domain = destination[3:]
        if not smarthost and self.mta_sts is not None:
            sts = await self.mta_sts.policy(domain)
            if sts is not None and sts.mode == NONE:
                sts = None
        if sts is not None:
            hosts = self._sts_hosts(domain, sts, hosts)
            if not hosts:
                self._fail_all(
                    jobs,
                    Reply(451, "4.7.5", f"No MX host of {domain} is listed in its MTA-STS policy"),
                )
                return
        targets = [(host, address) for host in hosts for address in host.addresses]
        for index, (host, address) in enumerate(targets):
            last = index == len(targets) - 1
            sts_tls = (
                self.mta_sts.client_tls(host.name, sts)
                if sts is not None
                and self.mta_sts is not None
                and (policy.use or sts.mode == ENFORCE)
                else None
            )
            try:
                conn = await self._connect(address, port, host.name, policy, smarthost, sts_tls)
            except SMTPClientError as e:
                # A refusal by one host (even a 5xx greeting) moves on to
                # the next, as Postfix's smtp_skip_5xx_greeting does.
                last_error = _error_reply(e)
                if sts is not None and sts_tls is not None:
                    last_error = self._sts_refused(domain, sts, sts_tls, e, last_error)
                log.info(
                    "Could not deliver via {host} [{address}]: {error}",
                    host=host.name,
                    address=address,
                    error=str(e),
                )
                if self.mx is not None and not smarthost:
                    self.mx.mark_bad(address)
                continue
            summary = conn.tls_summary()
            if summary is not None:
                version, _, cipher = summary.partition(" with cipher ")
                maillog.tls(
                    "outbound", version, cipher, relay=f"{host.name}[{address}]:{port}", log=log
                )
            if sts is not None and sts_tls is not None:
                self._sts_connected(domain, sts, sts_tls, conn.tls_active)
            next_host = False
            # The job after the current one, taken from the queue so that
            # its commands can follow the current message (client.send's
            # then=); it is the next one sent on this connection.
            held: _Job | None = None
            try:
                while conn.usable:
                    if held is not None:
                        job, held = held, None
                    elif jobs:
                        job = jobs.popleft()
                    elif await self._park(destination) and jobs and conn.usable:
                        job = jobs.popleft()
                    else:
                        break
                    if jobs and self._pipelinable(conn, job) and self._pipelinable(conn, jobs[0]):
                        held = jobs.popleft()
                    try:
                        retry = await self._transact(conn, job, host.name, last, held)
                    except Exception:
                        log.failure("Delivering {queue_id} failed", queue_id=job.envelope.id)
                        for r in job.recipients:
                            self._in_flight.discard((job.envelope.id, r.address))
                            r.next_attempt = self.reactor.seconds() + 300  # no hot loop
                            if r.state == PENDING:
                                self._waiting.add(job.envelope.id)
                                self._wake_at(job.envelope.id, r.next_attempt)
                        continue
                    if retry is not None:
                        # A recoverable error here: the next host may do
                        # better (Postfix's smtp(8) does the same).
                        if held is not None:
                            jobs.appendleft(held)
                            held = None
                        jobs.appendleft(retry[0])
                        last_error = retry[1]
                        next_host = True
                        break
                if conn.usable:
                    await conn.quit()
            finally:
                if held is not None:
                    jobs.appendleft(held)  # for another connection
                conn.abort()
            if not next_host:
                return  # the worker takes any jobs queued meanwhile
        self._fail_all(jobs, last_error)

    async def _connect(
        self,
        address: str,
        port: int,
        name: str,
        policy: TLSPolicy,
        smarthost: bool,
        sts_tls: STSClientTLS | None = None,
    ) -> Any:
        endpoint = self._endpoint_factory(address, port)
        if smarthost and self.relayhost is not None and self.relayhost.implicit_tls:
            tls_name = policy.name or name
            endpoint = wrapClientTLS(
                ssl.optionsForClientTLS(tls_name, trustRoot=policy.trust_root), endpoint
            )
        tls = policy.context(name) if sts_tls is None else ClientTLS(sts_tls)
        return await connect(
            self.reactor,
            endpoint,
            helo=self.hostname,
            tls=tls,
            # RFC 8461 §5: in enforce mode, never in clear.
            require_tls=policy.require or (sts_tls is not None and sts_tls.enforce),
            auth=self.auth if smarthost else None,
            timeouts=self.timeouts,
            trace=self.trace,
        )

    @staticmethod
    def _pipelinable(conn: Any, job: _Job) -> bool:
        """Is C{job} one transaction on C{conn} (not split per recipient)?"""
        return not (job.xverp and "XVERP" not in conn.extensions)

    def _transaction(self, job: _Job) -> Transaction:
        """The transaction of C{job}, made once (C{send(then=)} needs the same object)."""
        if job.transaction is not None:
            return job.transaction
        envelope = job.envelope
        made = self._made.get(envelope.id)
        if made is None:
            # What every transaction of this message shares (read-only).
            params: dict[str, str | None] = {}
            if envelope.params.get("BODY") == "8BITMIME":
                params["BODY"] = "8BITMIME"
            if "SMTPUTF8" in envelope.params:
                params["SMTPUTF8"] = None
            for key in ("RET", "ENVID"):
                if key in envelope.params:
                    params[key] = envelope.params[key]
            made = self._made[envelope.id] = (
                self.queue.data_path(envelope.id),
                params,
                {**params, "XVERP": None},
            )
        rcpt_params: dict[str, dict[str, str]] = {}
        for r in job.recipients:
            if r.notify or r.orcpt:
                wanted = rcpt_params[r.address] = {}
                if r.notify:
                    wanted["NOTIFY"] = r.notify
                if r.orcpt:
                    wanted["ORCPT"] = dsn.orcpt_parameter(r.orcpt)
        job.transaction = Transaction(
            sender=job.sender,
            recipients=[r.address for r in job.recipients],
            data_path=made[0],
            size=envelope.size,
            params=made[2] if job.xverp else made[1],
            data=self._message(envelope),
            checked=job.checked,
            rcpt_params=rcpt_params,
        )
        return job.transaction

    def _message(self, envelope: Envelope) -> bytes | None:
        """
        The message of a small envelope, read once while it is being
        delivered (queue files never change), so the client neither opens
        nor encodes it per recipient; C{None} for a large one (streamed from
        its file) or on a read error (the client reports it).
        """
        data = self._messages.get(envelope.id)
        if data is not None or envelope.size >= CHUNK_SIZE:
            return data
        try:
            with open(self.queue.data_path(envelope.id), "rb") as f:
                data = f.read(envelope.size + 1)
        except OSError:
            return None
        if len(data) != envelope.size:
            return None  # the client refuses the file, with the reason
        if len(self._messages) >= _MESSAGES_KEPT:
            del self._messages[next(iter(self._messages))]  # the oldest
        self._messages[envelope.id] = data
        return data

    async def _transact(
        self, conn: Any, job: _Job, remote: str, last: bool = True, then: _Job | None = None
    ) -> tuple[_Job, Reply] | None:
        """
        Send one job over C{conn} and record the outcomes.

        @param last: this is the last host to try. If not, recipients that
            got a transient reply (before the final dot) are not recorded.
        @param then: the job to send next on C{conn}: its commands may go
            out with this message (pipelining). Its message data only goes
            out with the next call, after this job's outcomes are recorded,
            so the at-least-once window stays one transaction per connection.
        @return: C{None}, or the job of the recipients to try on the next host
            with the reply that made it so.
        """
        if job.xverp and "XVERP" not in conn.extensions:
            # The smarthost does not do VERP: one transaction per recipient.
            for i, r in enumerate(job.recipients):
                sender = self._verp_sender(job.envelope.sender, r.address)
                one = _Job(job.envelope, [r], sender, made=job.made)
                retry = await self._transact(conn, one, remote, last)
                if retry is not None:
                    rest = [retry[0].recipients[0], *job.recipients[i + 1 :]]
                    return _Job(job.envelope, rest, job.sender, job.xverp, made=job.made), retry[1]
                if not conn.usable:
                    break
            return None
        envelope = job.envelope
        transaction = self._transaction(job)
        self.transactions += 1
        after_data = False
        try:
            if then is not None:
                result = await conn.send(transaction, then=self._transaction(then))
            else:
                result = await conn.send(transaction)
        except SMTPClientError as e:
            replies = {r.address: e.partial.get(r.address, _error_reply(e)) for r in job.recipients}
            after_data = e.after_data
            if e.after_data:
                log.warn(
                    "Connection to {remote} lost after the final dot for {queue_id}: "
                    "the retry may deliver a second copy",
                    remote=remote,
                    queue_id=envelope.id,
                )
        else:
            replies = result.recipients
        # A next hop that offers DSN was given NOTIFY and reports itself.
        reports = "DSN" in conn.extensions
        if not last and not after_data:
            again = [
                r for r in job.recipients if replies.get(r.address, status.LOCAL_ERROR).is_transient
            ]
            if again:
                done = [r for r in job.recipients if r not in again]
                if done:
                    await self._record(
                        _Job(envelope, done, job.sender, job.xverp, made=job.made),
                        replies,
                        remote,
                        next_hop_reports=reports,
                    )
                reply = replies.get(again[0].address, status.LOCAL_ERROR)
                log.info(
                    "{queue_id}: {reply} from {remote}; trying the next host",
                    queue_id=envelope.id,
                    reply=f"{reply.code} {reply.status_line()}",
                    remote=remote,
                )
                return _Job(envelope, again, job.sender, job.xverp, made=job.made), reply
        await self._record(job, replies, remote, next_hop_reports=reports)
        return None

    async def _deliver_locally(self, job: _Job) -> None:
        assert self.local_delivery is not None
        replies: dict[str, Reply] = {}
        for r in job.recipients:
            try:
                replies[r.address] = await self.local_delivery(
                    job.sender, r.address, self.queue.data_path(job.envelope.id)
                )
            except Exception:
                log.failure("Local delivery of {queue_id} failed", queue_id=job.envelope.id)
                replies[r.address] = status.LOCAL_ERROR
        await self._record(job, replies, self.hostname, final=True)

    def _fail_all(self, jobs: deque[_Job], reply: Reply) -> None:
        while jobs:
            job = jobs.popleft()
            Deferred.fromCoroutine(
                self._record(job, {r.address: reply for r in job.recipients}, "")
            ).addErrback(lambda f: log.failure("Recording a failure failed", f))
