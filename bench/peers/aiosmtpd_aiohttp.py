"""
Peer (c): a minimal aiosmtpd receiver (SMTP or LMTP) posting each message to
GroupServer's add-email page with aiohttp. No guarantees: the message is
held in memory, the group is looked up once per address and cached forever,
no ledger. The reply to DATA is sent once GroupServer answered.

    python bench/peers/aiosmtpd_aiohttp.py --port P --url http://127.0.0.1:S --token T [--lmtp]
"""

import argparse
import asyncio
import base64
import json

import aiohttp
from aiosmtpd.lmtp import LMTP
from aiosmtpd.smtp import SMTP


class Handler:
    def __init__(self, url, token):
        self.url = url.rstrip("/")
        self.token = token
        self.groups = {}
        self.session = None

    async def post(self, page, fields, message=None):
        if self.session is None:
            self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=32))
        data = aiohttp.FormData(default_to_multipart=True)
        for name, value in dict(fields, **{"form.token": self.token}).items():
            data.add_field(name, value)
        if message is not None:
            data.add_field("form.emailMessage", base64.b64encode(message), content_type="text/plain")
        async with self.session.post(f"{self.url}/{page}", data=data) as response:
            body = await response.read()
            if response.status != 200:
                raise RuntimeError(f"GroupServer said {response.status}")
            return body

    async def group(self, address):
        if address not in self.groups:
            body = await self.post(
                "gs-group-messages-add-group-exists.html",
                {"form.email": address, "form.actions.check": "Check"},
            )
            self.groups[address] = json.loads(body)["groupId"]
        return self.groups[address]

    async def handle_DATA(self, server, session, envelope):
        replies = []
        for address in envelope.rcpt_tos:
            try:
                group_id = await self.group(address)
                if group_id is None:
                    replies.append("550 5.1.1 No such group")
                    continue
                await self.post(
                    "gs-group-messages-add-email.html",
                    {"form.groupId": group_id, "form.timeSource": "server", "form.actions.add": "Add"},
                    envelope.original_content,
                )
                replies.append("250 2.0.0 OK")
            except Exception as e:
                replies.append(f"451 4.5.0 {e}")
        if isinstance(server, LMTP):
            return "\r\n".join(replies)
        return replies[0] if len(set(replies)) == 1 else "451 4.5.0 Partly failed"


async def serve(args):
    handler = Handler(args.url, args.token)
    cls = LMTP if args.lmtp else SMTP
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: cls(handler, hostname="peer.example.com", data_size_limit=None),
        "127.0.0.1",
        args.port,
        backlog=1024,
    )
    async with server:
        await server.serve_forever()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--url", required=True)
    parser.add_argument("--token", required=True)
    parser.add_argument("--lmtp", action="store_true")
    args = parser.parse_args()
    asyncio.run(serve(args))


if __name__ == "__main__":
    main()
