"""
Helpers shared by gsmail's tests: real-peer tool lookup (skip by hand, fail
in CI), a ready-made configuration and a running service on 127.0.0.1.
"""

from __future__ import annotations

import os
import shutil
from typing import Any

import attrs
from twisted.trial.unittest import SkipTest, TestCase

from gsmail.config import GsmailConfig
from gsmail.service import GsmailService, makeService

TOKEN = "test-token-0123456789"
DOMAIN = "groups.example.com"


def require_tool(name: str, *candidates: str) -> str:
    """
    The path of an external tool (swaks, postfix, ...). Missing: the test is
    skipped when run by hand, but fails when C{CI} is set, since CI installs it.
    """
    for candidate in (name, *candidates):
        path = shutil.which(candidate) or (
            candidate if os.path.isabs(candidate) and os.access(candidate, os.X_OK) else None
        )
        if path:
            return path
    message = f"{name} is not installed (apt-get install it; .ci/run does)"
    if os.environ.get("CI"):
        raise AssertionError(message)
    raise SkipTest(message)


def make_config(directory: str, **overrides: Any) -> GsmailConfig:
    """
    A configuration for tests: embedded stand-in with groups C{example} and
    C{dev} in C{groups.example.com}, ESMTP and LMTP on 127.0.0.1 port 0,
    state under C{directory}.
    """
    os.makedirs(directory, exist_ok=True)
    config = GsmailConfig(
        path=os.path.join(directory, "gsconfig.ini"),
        instance="default",
        url="embedded",
        token=TOKEN,
        smtp_endpoint="tcp:0:interface=127.0.0.1",
        lmtp_endpoint="tcp:0:interface=127.0.0.1",
        hostname="mx.groups.example.com",
        domains=(DOMAIN,),
        spool_dir=os.path.join(directory, "spool"),
        ledger_path=os.path.join(directory, "ledger", "posted.log"),
        standin_dir=os.path.join(directory, "standin"),
        postmaster_maildir=os.path.join(directory, "postmaster"),
        standin_groups=("example", "dev"),
    )
    return attrs.evolve(config, **overrides)


def start_service(test: TestCase, config: GsmailConfig, reactor: Any = None) -> GsmailService:
    """
    Start gsmail's service on the real reactor for C{test}; it is stopped
    (and everything it opened closed) by the test's cleanup.
    """
    if reactor is None:
        from twisted.internet import reactor as global_reactor

        reactor = global_reactor
    service = makeService(config, reactor)
    service.privilegedStartService()
    service.startService()
    test.addCleanup(service.stopService)
    return service


def port_of(service: GsmailService, name: str) -> int:
    """The TCP port the C{"smtp"} or C{"lmtp"} listener got."""
    return int(service.port(name).getHost().port)
