"""
Peer (d), the front: an aiosmtpd SMTP/LMTP receiver that, like Postfix's
pipe(8) into smtp2gs, runs one process per message and recipient with the
message on standard input (LF line endings, an X-Original-To header added)
and answers by its exit status (0: 250, 67: 550, other: 451).

    python bench/peers/pipe_front.py --port P --url URL --token T [--lmtp]
        [--command 'smtp2gs --config X {url}']

The default command is bench/peers/smtp2gs_pipe.py; a C{--command} given is
split on spaces, C{{url}} replaced; the token goes in C{GS_TOKEN}.
"""

import argparse
import asyncio
import os
import sys

from aiosmtpd.lmtp import LMTP
from aiosmtpd.smtp import SMTP

HERE = os.path.dirname(os.path.abspath(__file__))


class Handler:
    def __init__(self, command, token):
        self.command = command
        self.env = dict(os.environ, GS_TOKEN=token)

    async def pipe(self, address, content):
        message = b"X-Original-To: " + address.encode() + b"\n" + content.replace(b"\r\n", b"\n")
        process = await asyncio.create_subprocess_exec(
            *self.command, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE, env=self.env,
        )
        _, err = await process.communicate(message)
        if process.returncode == 0:
            return "250 2.0.0 OK"
        text = err.decode(errors="replace").strip().splitlines()[-1:] or ["failed"]
        return ("550 " if process.returncode == 67 else "451 ") + text[0]

    async def handle_DATA(self, server, session, envelope):
        replies = [await self.pipe(a, envelope.original_content) for a in envelope.rcpt_tos]
        if isinstance(server, LMTP):
            return "\r\n".join(replies)
        return replies[0]


async def serve(args):
    if args.command:
        command = [part.replace("{url}", args.url) for part in args.command.split()]
    else:
        command = [sys.executable, os.path.join(HERE, "smtp2gs_pipe.py"), args.url]
    handler = Handler(command, args.token)
    cls = LMTP if args.lmtp else SMTP
    server = await asyncio.get_running_loop().create_server(
        lambda: cls(handler, hostname="pipe.example.com", data_size_limit=None),
        "127.0.0.1", args.port, backlog=1024,
    )
    async with server:
        await server.serve_forever()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--url", required=True)
    parser.add_argument("--token", required=True)
    parser.add_argument("--lmtp", action="store_true")
    parser.add_argument("--command")
    asyncio.run(serve(parser.parse_args()))


if __name__ == "__main__":
    main()
