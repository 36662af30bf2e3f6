"""
The configuration file of the reload tests (unit and integration): the
embedded stand-in, TLS from C{tls/} (see L{tests.certificates.new_certificate}).
"""

from __future__ import annotations

import os

from tests.util import DOMAIN, TOKEN

CONFIG = """\
[webservice-default]
token = {token}
[gsmail-default]
url = embedded
standin_groups = example
smtp_endpoint = tcp:0:interface=127.0.0.1
domains = {domains}
hostname = mx.groups.example.com
ledger_path = state/ledger/posted.log
spool_dir = state/spool
standin_dir = state/standin
postmaster_maildir = state/postmaster
route_state_dir = state/routes
errors_dir = state/errors
rejected_dir = state/rejected
tls_certificate = tls/cert.pem
tls_key = tls/key.pem
{more}
"""


def write_config(directory: str, domains: str = DOMAIN, more: str = "") -> str:
    """The configuration file of these tests (TLS from C{tls/}), written to C{directory}."""
    path = os.path.join(directory, "gsconfig.ini")
    with open(path, "w") as f:
        f.write(CONFIG.format(token=TOKEN, domains=domains, more=more))
    return path
