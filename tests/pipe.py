"""
What the tests of the pipe command (C{smtp2gs}: tests/test_script.py and
tests/integration/test_postfix_pipe.py) share: the token, groups and sender
they use, and its configuration file.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Final

#: The token of the pipe's site (never printed: the tests check).
TOKEN: Final = "pipe-T0ken-never-printed"
GROUPS: Final = {"example@groups.example.com": "example", "dev@groups.example.com": "dev"}
SENDER: Final = "alice@example.org"


def write_config(
    directory: str,
    token: str = TOKEN,
    gsmail: Mapping[str, str] | None = None,
    smtp: Mapping[str, str] | None = None,
) -> str:
    """A gs.config file in the short form; C{gsmail}/C{smtp}: those sections."""
    directory = os.path.abspath(directory)
    os.makedirs(directory, exist_ok=True)
    lines = ["[webservice-default]", f"token = {token}"]
    for name, options in (("smtp", smtp), ("gsmail", gsmail)):
        if options is not None:
            lines.append(f"[{name}-default]")
            lines += [f"{key} = {value}" for key, value in options.items()]
    path = os.path.join(directory, "gsconfig.ini")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    return path
