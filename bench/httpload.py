"""
The stand-in's own capacity: posts to its add-email page as fast as C
concurrent keep-alive connections can, so the reader knows whether the
GroupServer side limits the figures.

    python bench/httpload.py --port P [--concurrency 20] [--count N]
        [--size 4096] [--time-limit S]

Prints C{{"posts": n, "seconds": s, "errors": e}}. A raw asyncio HTTP/1.1
client (no library in the way); it shares the machine's cores with the
stand-in, so the figure is a lower bound.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
# Run from a checkout: the tree's gsmail, not an installed copy.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common import add_email_fields, form_body, make_message, new_message_id  # noqa: E402

from gsmail.answers import PageResult, read_status  # noqa: E402

PATH = "/gs-group-messages-add-email.html"
BOUNDARY = "benchboundary0123456789"


async def run(args: argparse.Namespace) -> dict[str, object]:
    fields = add_email_fields()
    done = 0
    errors = 0
    remaining = args.count
    stop_at = time.monotonic() + args.time_limit

    async def connection() -> None:
        nonlocal done, errors, remaining
        reader, writer = await asyncio.open_connection("127.0.0.1", args.port)
        try:
            while remaining > 0 and time.monotonic() < stop_at:
                remaining -= 1
                body = form_body(fields, make_message(new_message_id(), args.size), BOUNDARY)
                writer.write(
                    f"POST {PATH} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                    f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\n"
                    f"Content-Length: {len(body)}\r\n\r\n".encode("ascii")
                    + body
                )
                status = await reader.readline()
                length = 0
                while (line := await reader.readline()) not in (b"\r\n", b""):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                answer = await reader.readexactly(length)
                # The page's form again under the status message "Done".
                if b" 200 " not in status or read_status(answer).result is not PageResult.DONE:
                    errors += 1
                else:
                    done += 1
        finally:
            writer.close()

    begin = time.monotonic()
    await asyncio.gather(*(connection() for _ in range(args.concurrency)))
    return {"posts": done, "seconds": time.monotonic() - begin, "errors": errors}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--concurrency", type=int, default=20)
    parser.add_argument("--count", type=int, default=5000)
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--time-limit", type=float, default=60.0)
    args = parser.parse_args()
    print(json.dumps(asyncio.run(run(args))))


if __name__ == "__main__":
    main()
