"""
Peer (d), the per-message part: a script of smtp2gs's shape. Postfix's pipe
runs it once per message with the message on standard input; it reads the
list address from X-Original-To, takes the global lock smtp2gs took, looks
the group up and posts the message with urllib, then exits with a sysexits
value (0 done, 67 no such group, 75 try again, 76 protocol error).

    GS_TOKEN=T python bench/peers/smtp2gs_pipe.py http://127.0.0.1:S < message
"""

import base64
import fcntl
import json
import os
import sys
import urllib.request
from email.parser import BytesHeaderParser

BOUNDARY = "pipeboundary7e2a"
LOCK = os.environ.get("GS_LOCK", "/tmp/gsmail-bench-smtp2gs.lock")


def post(url, page, fields, message=None):
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
    request = urllib.request.Request(
        f"{url.rstrip('/')}/{page}",
        data=b"".join(parts),
        headers={"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"},
    )
    with urllib.request.urlopen(request, timeout=240) as response:
        return response.read()


def main():
    url = sys.argv[1]
    token = os.environ["GS_TOKEN"]
    message = sys.stdin.buffer.read()
    if not message:
        print("5.3.0 The message was empty", file=sys.stderr)
        return 65
    to = BytesHeaderParser().parsebytes(message).get("X-Original-To")
    if not to:
        print("5.1.3 No X-Original-To header", file=sys.stderr)
        return 65
    with open(LOCK, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # smtp2gs posted one message at a time
        try:
            reply = post(url, "gs-group-messages-add-group-exists.html",
                         {"form.email": to, "form.token": token, "form.actions.check": "Check"})
            group_id = json.loads(reply)["groupId"]
            if group_id is None:
                print("5.1.1 No such group", file=sys.stderr)
                return 67
            post(url, "gs-group-messages-add-email.html",
                 {"form.groupId": group_id, "form.timeSource": "server", "form.token": token,
                  "form.actions.add": "Add"}, message)
        except (OSError, ValueError) as e:
            print(f"4.5.0 Error communicating with the server: {e}", file=sys.stderr)
            return 76
    return 0


if __name__ == "__main__":
    sys.exit(main())
