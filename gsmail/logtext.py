# -*- test-case-name: tests.test_logtext -*-
"""
Values from the network made safe for one log line.

A client chooses its HELO name, its addresses, its MAIL/RCPT parameters and
every byte of its message (the C{Message-ID} too). Logged raw, an ESC or BEL
drives the terminal of whoever reads the log, a CR or LF forges a log line,
and a 200 KB C{Message-ID} makes a 200 KB line. L{printable} escapes what is
not printable and caps the length; every log call that formats such a value
passes it through here first. Postfix does the same with its C{printable()}
(which writes C{?}); gsmail writes an escape instead, so the value can still
be told apart from a real C{?}.
"""

from __future__ import annotations

__all__ = ["printable", "MAX_LOGGED"]

#: Characters of one value kept in a log line; the rest is counted, not shown.
MAX_LOGGED = 256


def printable(value: object, limit: int = MAX_LOGGED) -> str:
    """
    C{value} as text fit for one log line: each character that is not
    printable (C0 and C1 controls, DEL, U+2028/U+2029 and the other line and
    paragraph separators, format characters, lone surrogates) becomes a
    Python-style escape (ESC is C{\\x1b}, U+2028 is C{\\u2028}), a backslash
    becomes C{\\\\}, and past C{limit} characters of output the rest is
    replaced by C{...[N more characters]}, N counting the characters of the
    value left out.

    @param value: C{str}; C{bytes} are decoded as UTF-8, undecodable bytes
        escaped (C{\\xff}); anything else goes through C{str()}.
    @param limit: characters of output at most before the marker.
    @return: a string without CR, LF or any other unprintable character.
    """
    if isinstance(value, bytes):
        text = value.decode("utf-8", "surrogateescape")
    elif isinstance(value, str):
        text = value
    else:
        text = str(value)
    if len(text) <= limit and text.isprintable() and "\\" not in text:
        return text
    out: list[str] = []
    length = 0
    for index, char in enumerate(text):
        if char == "\\":
            piece = "\\\\"
        elif char.isprintable():
            piece = char
        else:
            code = ord(char)
            if 0xDC80 <= code <= 0xDCFF:
                code -= 0xDC00  # a byte that was not UTF-8 (surrogateescape)
            if code < 0x100:
                piece = f"\\x{code:02x}"
            elif code < 0x10000:
                piece = f"\\u{code:04x}"
            else:
                piece = f"\\U{code:08x}"
        if length + len(piece) > limit:
            out.append(f"...[{len(text) - index} more characters]")
            break
        out.append(piece)
        length += len(piece)
    return "".join(out)
