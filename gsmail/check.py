# -*- test-case-name: tests.test_check -*-
"""C{gsmail-check}: not written yet."""

from __future__ import annotations

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    """Check a configuration (to come)."""
    raise NotImplementedError
