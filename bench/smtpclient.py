"""
The latency client: an asyncio SMTP/LMTP client that timestamps every
message, for what smtp-source cannot tell (it reports no per-message times).

    python bench/smtpclient.py --port P [--lmtp] [--sessions 20] [--count N]
        [--size 4096] [--rate R] [--time-limit S] [--file MESSAGE]

Each session holds one connection (EHLO/LHLO once) and sends one message
per transaction to the list address, each with a unique Message-ID. Without
C{--rate} the sessions send back to back (closed loop, "under load"); with
C{--rate R} messages are started R per second (open loop, "light load").
C{--file} sends that one message (CRLF lines, no line starting with a dot)
once, streamed from disk.

Prints one JSON object: C{{"records": [[message_id, t_start, t_ack, code],
...], "errors": n}}, times in C{time.monotonic()} seconds: t_start when MAIL
FROM is sent, t_ack when the reply to the end of DATA came.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import LIST_ADDRESS, SENDER, make_message, new_message_id  # noqa: E402

#: Seconds to wait for any one reply.
REPLY_TIMEOUT = 300.0
_CHUNK = 1 << 20


class SMTPError(Exception):
    """The server answered something other than the expected reply."""


async def _reply(reader: asyncio.StreamReader) -> tuple[int, str]:
    lines = []
    while True:
        line = await asyncio.wait_for(reader.readline(), REPLY_TIMEOUT)
        if not line:
            raise SMTPError("connection closed")
        lines.append(line.decode("latin-1").rstrip())
        if line[3:4] != b"-":
            return int(line[:3]), "\n".join(lines)


async def _command(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, line: str, expect: int
) -> None:
    writer.write(line.encode("ascii") + b"\r\n")
    code, text = await _reply(reader)
    if code != expect:
        raise SMTPError(f"{line.split()[0]}: {text}")


class Session:
    """One connection sending messages one transaction at a time."""

    def __init__(self, port: int, lmtp: bool) -> None:
        self.port = port
        self.lmtp = lmtp

    async def open(self) -> None:
        self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        code, text = await _reply(self.reader)
        if code != 220:
            raise SMTPError(f"greeting: {text}")
        await _command(self.reader, self.writer, ("LHLO" if self.lmtp else "EHLO") + " bench", 250)

    async def send(
        self, message_id: str, data: bytes | None, path: str | None
    ) -> tuple[float, float, int]:
        r, w = self.reader, self.writer
        start = time.monotonic()
        await _command(r, w, f"MAIL FROM:<{SENDER}>", 250)
        await _command(r, w, f"RCPT TO:<{LIST_ADDRESS}>", 250)
        await _command(r, w, "DATA", 354)
        if data is not None:
            w.write(data)
        else:
            assert path is not None
            with open(path, "rb") as f:
                while chunk := f.read(_CHUNK):
                    w.write(chunk)
                    await w.drain()
        w.write(b".\r\n")
        code, _ = await _reply(r)
        return start, time.monotonic(), code

    async def close(self) -> None:
        try:
            self.writer.write(b"QUIT\r\n")
            await asyncio.wait_for(_reply(self.reader), 5)
        except (OSError, SMTPError, TimeoutError):
            pass
        self.writer.close()


async def run(args: argparse.Namespace) -> dict[str, object]:
    records: list[list[object]] = []
    errors = 0
    jobs: asyncio.Queue[float | None] = asyncio.Queue()
    stop_at = time.monotonic() + args.time_limit

    async def worker() -> None:
        nonlocal errors
        session = Session(args.port, args.lmtp)
        await session.open()
        try:
            while await jobs.get() is not None:
                if time.monotonic() > stop_at:
                    continue
                message_id = new_message_id()
                data = None if args.file else make_message(message_id, args.size)
                try:
                    start, ack, code = await session.send(message_id, data, args.file)
                except SMTPError as e:
                    errors += 1
                    print(f"smtpclient: {e}", file=sys.stderr)
                    await session.close()
                    session = Session(args.port, args.lmtp)
                    await session.open()
                    continue
                if code // 100 != 2:
                    errors += 1
                records.append([message_id, start, ack, code])
        finally:
            await session.close()

    count = 1 if args.file else args.count
    sessions = min(args.sessions, count)
    workers = [asyncio.create_task(worker()) for _ in range(sessions)]
    if args.rate:
        begin = time.monotonic()
        for i in range(count):
            delay = begin + i / args.rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            if time.monotonic() > stop_at:
                break
            jobs.put_nowait(begin + i / args.rate)
    else:
        for _ in range(count):
            jobs.put_nowait(0.0)
    for _ in workers:
        jobs.put_nowait(None)
    await asyncio.gather(*workers)
    if args.file:
        # The file's own Message-ID, which the stand-in reports.
        with open(args.file, "rb") as f:
            head = f.read(4096).split(b"\r\n\r\n")[0]
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"message-id:"):
                for record in records:
                    record[0] = line.split(b":", 1)[1].strip().decode("ascii")
    return {"records": records, "errors": errors}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--lmtp", action="store_true")
    parser.add_argument("--sessions", type=int, default=20)
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--rate", type=float, default=0.0)
    parser.add_argument("--time-limit", type=float, default=120.0)
    parser.add_argument("--file")
    args = parser.parse_args()
    print(json.dumps(asyncio.run(run(args))))


if __name__ == "__main__":
    main()
