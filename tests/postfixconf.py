"""
The configuration of a private Postfix instance (own configuration, queue,
data directory and log under one directory, smtpd on 127.0.0.1, no DNS, no
chroot), written once for the tests' instance (L{tests.integration.postfix})
and the benchmarks' (C{bench/outbound.py}, which imports this module: it
needs nothing but the standard library).
"""

from __future__ import annotations

import os
import pwd
from collections.abc import Iterable, Mapping
from typing import Final

#: master.cf's services besides smtpd (Postfix 3.7's defaults that a relay
#: or an LMTP/pipe delivery needs), none chrooted (fifth column C{n}).
#: service type private unpriv chroot wakeup maxproc command
SERVICES: Final = (
    "cleanup unix n - n - 0 cleanup",
    "qmgr unix n - n 300 1 qmgr",
    "rewrite unix - - n - - trivial-rewrite",
    "bounce unix - - n - 0 bounce",
    "defer unix - - n - 0 bounce",
    "trace unix - - n - 0 bounce",
    "verify unix - - n - 1 verify",
    "proxymap unix - - n - - proxymap",
    "proxywrite unix - - n - 1 proxymap",
    "smtp unix - - n - - smtp",
    "relay unix - - n - - smtp",
    "lmtp unix - - n - - lmtp",
    "error unix - - n - - error",
    "retry unix - - n - - error",
    "discard unix - - n - - discard",
    "anvil unix - - n - 1 anvil",
    "scache unix - - n - 1 scache",
    "postlog unix-dgram n - n - 1 postlogd",
)


def directories(directory: str) -> tuple[str, str, str]:
    """
    The instance's configuration, queue and data directories under
    C{directory} (C{etc}, C{queue}, C{data}), made; the data directory
    belongs to the C{postfix} user, since the master takes its lock there
    as the mail_owner. Needs root and the C{postfix} user.
    """
    etc, queue, data = (os.path.join(directory, name) for name in ("etc", "queue", "data"))
    os.makedirs(etc)
    os.makedirs(queue)  # root-owned; Postfix makes the rest
    os.makedirs(data)
    postfix = pwd.getpwnam("postfix")
    os.chown(data, postfix.pw_uid, postfix.pw_gid)
    return etc, queue, data


def main_cf(directory: str, myhostname: str) -> dict[str, str]:
    """
    The C{main.cf} parameters every private instance has: its directories
    and log under C{directory}, loopback only, no local delivery, no
    aliases, no DNS. Add the instance's own (transports, timers) over them.
    """
    return {
        # Postfix 3.7 knows levels up to 3.6 (Debian's main.cf sets the same).
        "compatibility_level": "3.6",
        "config_directory": os.path.join(directory, "etc"),
        "queue_directory": os.path.join(directory, "queue"),
        "data_directory": os.path.join(directory, "data"),
        "myhostname": myhostname,
        "mydestination": "",
        "inet_interfaces": "loopback-only",
        "inet_protocols": "ipv4",
        "mynetworks": "127.0.0.0/8",
        "alias_maps": "",
        "alias_database": "",
        "biff": "no",
        # No DNS anywhere.
        "smtp_dns_support_level": "disabled",
        "smtp_host_lookup": "native",
        "smtpd_peername_lookup": "no",
        # The log (written by the postlog service), read by tests and benchmarks.
        "maillog_file": os.path.join(directory, "maillog"),
        "maillog_file_prefixes": directory,
    }


def master_cf(port: int, more: Iterable[str] = ()) -> str:
    """C{master.cf}: smtpd on 127.0.0.1:C{port}, L{SERVICES}, then the lines C{more}."""
    lines = [f"127.0.0.1:{port} inet n - n - - smtpd", *SERVICES, *more]
    return "".join(line + "\n" for line in lines)


def write(etc: str, params: Mapping[str, str], master: str) -> None:
    """Write C{main.cf} (C{params}) and C{master.cf} (C{master}) into C{etc}."""
    with open(os.path.join(etc, "main.cf"), "w", encoding="utf-8") as f:
        f.writelines(f"{name} = {value}\n" for name, value in params.items())
    with open(os.path.join(etc, "master.cf"), "w", encoding="utf-8") as f:
        f.write(master)
