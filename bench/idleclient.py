"""
Case 4's idle sessions: an asyncio client that opens many SMTP (or LMTP)
connections to 127.0.0.1, reads each greeting, sends EHLO (LHLO), reads the
reply, and then stays idle, holding them open.

    python bench/idleclient.py --port P [--count 1000] [--lmtp]
        [--parallel 50] [--time-limit 300]

Prints one JSON line once every connection is set up (or failed):
C{{"opened": n, "failed": n, "seconds": s, "error": "first failure"}}. Then
it waits for a line on standard input (or end of input, or C{--time-limit}
seconds), prints C{{"held": n}} (connections the server has not closed nor
written to since the EHLO reply) and closes every connection.

At most C{--parallel} handshakes are in flight at once: a burst of 1,000
SYNs overflows a listen backlog of 50 (Twisted's default) and the kernel's
retransmission then adds whole seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import sys
import time

#: Seconds to wait for the greeting or the EHLO reply.
REPLY_TIMEOUT = 30.0


class Idle:
    """One idle connection; C{dropped} once the server closes it or writes to it."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.dropped = False
        self.watch = asyncio.create_task(self._watch())

    async def _watch(self) -> None:
        try:
            await self.reader.read(4096)  # anything (a 421, EOF) means the session is over
        except OSError:
            pass
        self.dropped = True

    def close(self) -> None:
        self.watch.cancel()
        self.writer.close()


async def _reply(reader: asyncio.StreamReader) -> int:
    while True:
        line = await asyncio.wait_for(reader.readline(), REPLY_TIMEOUT)
        if not line:
            raise ConnectionError("closed by the server")
        if line[3:4] != b"-":
            return int(line[:3])


async def _open(port: int, lmtp: bool) -> Idle:
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection("127.0.0.1", port), REPLY_TIMEOUT
    )
    try:
        code = await _reply(reader)
        if code != 220:
            raise ConnectionError(f"greeting {code}")
        writer.write(b"LHLO idle.bench\r\n" if lmtp else b"EHLO idle.bench\r\n")
        code = await _reply(reader)
        if code != 250:
            raise ConnectionError(f"EHLO {code}")
    except BaseException:
        writer.close()
        raise
    return Idle(reader, writer)


async def run(args: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    gate = asyncio.Semaphore(args.parallel)
    errors: list[str] = []

    async def one() -> Idle | None:
        async with gate:
            try:
                return await _open(args.port, args.lmtp)
            except (OSError, TimeoutError, ValueError) as e:
                errors.append(f"{e.__class__.__name__}: {e}")
                return None

    start = time.monotonic()
    opened = [s for s in await asyncio.gather(*(one() for _ in range(args.count))) if s]
    ready = {
        "opened": len(opened),
        "failed": len(errors),
        "seconds": time.monotonic() - start,
        "error": errors[0] if errors else "",
    }
    print(json.dumps(ready), flush=True)

    stdin = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)
    try:
        await asyncio.wait_for(stdin.readline(), args.time_limit)
    except TimeoutError:
        pass
    print(json.dumps({"held": sum(1 for s in opened if not s.dropped)}), flush=True)
    for session in opened:
        session.close()
    await asyncio.sleep(0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--lmtp", action="store_true")
    parser.add_argument("--parallel", type=int, default=50)
    parser.add_argument("--time-limit", type=float, default=300.0)
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = args.count + 64
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(wanted, hard), hard))
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
