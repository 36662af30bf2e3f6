"""
Peer (b): a minimal Twisted ESMTP/LMTP receiver posting each message to
GroupServer's add-email page with treq. No guarantees: the message is held
in memory, the group is looked up once per address and cached forever, no
ledger. The reply to DATA is sent once GroupServer answered (as gsmail does).

    python bench/peers/twisted_treq.py --port P --url http://127.0.0.1:S --token T [--lmtp]
        [--post-concurrency N]

--post-concurrency N: at most N posts in flight at once, the rest wait (as
gsmail's post_concurrency); default: no limit.
"""

import argparse
import base64
import json

from twisted.internet import defer, reactor
from twisted.internet.protocol import Factory
from twisted.mail import smtp
from twisted.web.client import Agent, HTTPConnectionPool
from zope.interface import implementer
import treq

BOUNDARY = "peerboundary5f1c"


def form(fields, message=None):
    parts = [
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
        for k, v in fields.items()
    ]
    if message is not None:
        parts.append(
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="form.emailMessage"\r\n\r\n'.encode()
            + base64.b64encode(message) + b"\r\n"
        )
    parts.append(f"--{BOUNDARY}--\r\n".encode())
    return b"".join(parts)


class GroupServer:
    def __init__(self, url, token, post_concurrency=0):
        self.url = url.rstrip("/")
        self.slots = defer.DeferredSemaphore(post_concurrency) if post_concurrency else None
        self.token = token
        pool = HTTPConnectionPool(reactor)
        pool.maxPersistentPerHost = 32
        self.http = treq.client.HTTPClient(Agent(reactor, pool=pool))
        self.groups = {}
        self.headers = {b"Content-Type": [f"multipart/form-data; boundary={BOUNDARY}".encode()]}

    async def post(self, page, fields, message=None):
        fields = dict(fields, **{"form.token": self.token})
        response = await self.http.post(
            f"{self.url}/{page}", data=form(fields, message), headers=self.headers
        )
        body = await response.content()
        if response.code != 200:
            raise smtp.SMTPServerError(451, "4.5.0 GroupServer said %d" % response.code)
        return body

    async def group(self, address):
        if address not in self.groups:
            body = await self.post(
                "gs-group-messages-add-group-exists.html",
                {"form.email": address, "form.actions.check": "Check"},
            )
            self.groups[address] = json.loads(body)["groupId"]
        return self.groups[address]

    async def add(self, address, message):
        group_id = await self.group(address)
        if group_id is None:
            raise smtp.SMTPServerError(550, "5.1.1 No such group")
        if self.slots is not None:
            await self.slots.acquire()
            try:
                return await self._add(group_id, message)
            finally:
                self.slots.release()
        await self._add(group_id, message)

    async def _add(self, group_id, message):
        await self.post(
            "gs-group-messages-add-email.html",
            {"form.groupId": group_id, "form.timeSource": "server", "form.actions.add": "Add"},
            message,
        )


@implementer(smtp.IMessage)
class Message:
    def __init__(self, gs, address):
        self.gs = gs
        self.address = address
        self.lines = []

    def lineReceived(self, line):
        self.lines.append(line)

    def eomReceived(self):
        message = b"\n".join(self.lines) + b"\n"
        self.lines = None
        return defer.Deferred.fromCoroutine(self.gs.add(self.address, message))

    def connectionLost(self):
        self.lines = None


@implementer(smtp.IMessageDelivery)
class Delivery:
    def __init__(self, gs):
        self.gs = gs

    def receivedHeader(self, helo, origin, recipients):
        return None

    def validateFrom(self, helo, origin):
        return origin

    def validateTo(self, user):
        address = str(user.dest)
        return lambda: Message(self.gs, address)


class LMTP(smtp.ESMTP):
    """LMTP is ESMTP with LHLO; one recipient per message here, so one reply."""

    def do_LHLO(self, rest):
        self.do_EHLO(rest)


class ServerFactory(Factory):
    def __init__(self, gs, lmtp):
        self.gs = gs
        self.protocol = LMTP if lmtp else smtp.ESMTP

    def buildProtocol(self, addr):
        p = self.protocol()
        p.host = b"peer.example.com"
        p.delivery = Delivery(self.gs)
        p.factory = self
        return p


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--url", required=True)
    parser.add_argument("--token", required=True)
    parser.add_argument("--lmtp", action="store_true")
    parser.add_argument("--post-concurrency", type=int, default=0)
    args = parser.parse_args()
    factory = ServerFactory(GroupServer(args.url, args.token, args.post_concurrency), args.lmtp)
    reactor.listenTCP(args.port, factory, interface="127.0.0.1", backlog=1024)
    reactor.run()


if __name__ == "__main__":
    main()
