# -*- test-case-name: tests.test_tap -*-
"""
C{twistd gsmail}: command-line options and the service maker behind the
plugin in C{twisted/plugins/gsmail_plugin.py}.
"""

from __future__ import annotations

import os
import sys

from twisted.application.service import IService
from twisted.python import usage

from gsmail.config import ConfigError, load_config
from gsmail.status import EX_CONFIG

__all__ = ["Options", "makeService"]


class Options(usage.Options):
    """
    C{twistd gsmail --config PATH [--instance NAME]}.
    """

    synopsis = "[--config PATH] [--instance NAME]"
    optParameters = [
        ["config", "c", "/etc/groupserver/gsconfig.ini", "GroupServer's configuration file."],
        ["instance", "i", "default", "The configuration instance ([config-INSTANCE])."],
    ]
    longdesc = (
        "Receive mail for GroupServer groups over ESMTP and LMTP and add each "
        "message to its group exactly once."
    )


def makeService(options: Options) -> IService:
    """
    Load the configuration and build the service. A configuration error
    prints one line naming the file, section and option and exits with
    EX_CONFIG (78).
    """
    from gsmail.config import verp_key_path
    from gsmail.service import makeService as make
    from gsmail.verp import VerpKeyError, VerpKeys

    try:
        config = load_config(options["config"], options["instance"])
        key_file = verp_key_path(config)
        if os.path.lexists(key_file):
            # A malformed key file is a configuration error; one that does
            # not exist yet is made at start (after privileges are dropped).
            try:
                VerpKeys.read(key_file)
            except VerpKeyError as e:
                raise ConfigError(f"verp_key_file: {e}") from None
        return make(config)
    except ConfigError as e:
        sys.stderr.write(f"gsmail: configuration error: {e}\n")
        raise SystemExit(EX_CONFIG) from None
