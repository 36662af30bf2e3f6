"""
gsconfig.ini files for the configuration tests: the full form's text
(L{ini}) and a test case that writes files into a fresh directory.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from twisted.trial.unittest import SynchronousTestCase

from gsmail.config import (
    GsmailConfig,
    load_config,
)
from gsmail.config import site as config_site

TOKEN = "Tk-9f8e7d6c5b4a"
FQDN = "mx.test.example"

BASE_GSMAIL: Mapping[str, str] = {
    "url": "https://groups.example.com",
    "lmtp_endpoint": "unix:/run/gsmail/lmtp.sock",
    "domains": "groups.example.com",
}


def ini(
    gsmail: Mapping[str, str | None] = {},
    token_line: str | None = f"token = {TOKEN}",
    smtp: str | None = "hostname = localhost",
) -> str:
    """
    The text of a full-form gsconfig.ini for the instance C{default}.

    @param gsmail: options of C{[gsmail-default]} to set, over
        L{BASE_GSMAIL}; C{None} removes one.
    @param token_line: the line of C{[webservice-default]} giving the token.
    @param smtp: the body of C{[smtp-main]}; C{None}: no smtp section at all.
    """
    options = {**BASE_GSMAIL, **gsmail}
    lines = ["[config-default]", "webservice = default", "gsmail = default"]
    if smtp is not None:
        lines += ["smtp = main", "", "[smtp-main]", smtp]
    lines += ["", "[webservice-default]"]
    if token_line is not None:
        lines.append(token_line)
    lines += ["", "[gsmail-default]"]
    lines += [f"{name} = {value}" for name, value in options.items() if value is not None]
    return "\n".join(lines) + "\n"


class ConfigFileTestCase(SynchronousTestCase):
    """
    Writes configuration files into a fresh directory per test.
    """

    def setUp(self) -> None:
        self.directory = os.path.abspath(self.mktemp())
        os.makedirs(self.directory)
        # Looking up the real name may be slow, and its result varies.
        self.patch(config_site, "getfqdn", lambda: FQDN)

    def write(self, text: str, name: str = "gsconfig.ini") -> str:
        path = os.path.join(self.directory, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w", encoding="utf-8") as stream:
            stream.write(text)
        return path

    def load(self, gsmail: Mapping[str, str | None] = {}, **kwargs: str | None) -> GsmailConfig:
        return load_config(self.write(ini(gsmail, **kwargs)))
