# -*- test-case-name: tests.test_verp -*-
"""
Signed VERP addresses: the envelope senders gsmail gives each member's copy
of a group's mail carry a day stamp and a keyed hash of the group and the
member (as BATV's C{prvs} tag does, draft-levine-smtp-batv), so a bounce to
an address gsmail never made, or made too long ago, is not recorded.

Forms of a bounce address (local parts; the domain is the group's):

  - full, signed: C{LIST+MEMBERLOCAL=MEMBERDOMAIN=TAG}, e.g.
    C{dev+alice=example.org=aaxk4m2qzrb}. The member is read from the
    address, as from Postfix's XVERP form; the tag comes last, after the last
    C{=}: a tag has no dot, a domain has one, so the unsigned form can never
    be read as this one.
  - short, signed: C{LIST+TAG}, used when the full form would be longer than
    RFC 5321's 64 octets (§4.5.3.1.1), or the member's address is quoted or
    an address literal. The address does not name the member: the bounce's
    own report does (C{Final-Recipient} or C{Original-Recipient}, or what
    flufl.bounce finds), and the tag proves which of the reported addresses
    gsmail sent to.
  - unsigned: C{LIST+MEMBERLOCAL=MEMBERDOMAIN}, what Postfix's XVERP and gsmail
    before signing made; accepted only until C{verp_unsigned_until}.

C{TAG} is 11 characters of lowercase base32 (RFC 4648 alphabet, C{a-z2-7}):
3 for the day (days since 1970-01-01 UTC, modulo 32768, so a stamp repeats
after 89 years) and 8 for the first 40 bits of HMAC-SHA256 over the day, the
group's address and the member's address, all lowercased. Lowercase, since
some MTAs lowercase the local part they bounce to; the hash is over
lowercased addresses for the same reason.

A tag is valid when one of the keys (the first signs, every one verifies:
that is how a key is rotated) gives the same hash and the day is at most
C{verp_max_age} days old (one day in the future is allowed, for clocks a
little apart).
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import hmac
import math
import os
import re
import secrets
import time
from collections.abc import Iterable
from typing import Final, Protocol

import attrs
from twisted.logger import Logger

from gsmail.addresses import (
    MAX_LOCAL_PART,
    Address,
    AddressError,
    BounceCheck,
    Route,
    RouteKind,
    decode_xverp,
    parse_mailbox,
)

__all__ = [
    "DAY_MODULUS",
    "TAG_LENGTH",
    "VerpAddress",
    "VerpKeyError",
    "VerpKeys",
    "VerpPolicy",
    "WallClock",
    "day_of",
    "make_tag",
    "parse_verp",
    "sign_verp",
    "unsigned_until",
    "verify_tag",
]

log = Logger()

#: Seconds in a day stamp's day (UTC days, as POSIX time counts them).
DAY: Final = 86400
#: Day stamps are days since the epoch modulo this (three base32 characters).
DAY_MODULUS: Final = 32**3
_DAY_CHARS: Final = 3
#: Bytes of the HMAC-SHA256 kept: 40 bits, eight base32 characters.
_MAC_BYTES: Final = 5
#: The length of a tag: day stamp and hash.
TAG_LENGTH: Final = _DAY_CHARS + 8
_TAG: Final = re.compile(r"[a-z2-7]{11}\Z")
#: What the hash is over is prefixed with this, so another use of the key
#: (none today) can never give the same hash.
_CONTEXT: Final = "gsmail-verp-1"
#: A key is at least this many bytes (128 bits); generated keys have 32.
MIN_KEY_BYTES: Final = 16
_GENERATED_KEY_BYTES: Final = 32
_CREATED: Final = re.compile(r"#\s*created\s+(\d{4}-\d{2}-\d{2})\b", re.IGNORECASE)
# A local part that needs no quoting: atext (RFC 5322 §3.2.3, widened to
# non-ASCII by RFC 6531) and dots.
_DOT_ATOM: Final = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~\-\u0080-\U0010ffff.]+\Z")


class VerpKeyError(Exception):
    """
    The key file cannot be read, made or used. C{str()} names the file and the
    problem, never a key. The daemon does not start (exit 78, EX_CONFIG);
    C{smtp2gs} answers C{451 4.3.5} to a signed bounce address.
    """


def day_of(seconds: float) -> int:
    """The day stamp of POSIX time C{seconds}: whole UTC days since 1970, modulo 32768."""
    return int(seconds // DAY) % DAY_MODULUS


def _base32(data: bytes) -> str:
    return base64.b32encode(data).decode("ascii").rstrip("=").lower()


def _stamp_text(stamp: int) -> str:
    # Three base32 digits, most significant first.
    alphabet = "abcdefghijklmnopqrstuvwxyz234567"
    return "".join(alphabet[(stamp >> shift) & 31] for shift in (10, 5, 0))


def _stamp_value(text: str) -> int:
    value = 0
    for char in text:
        value = value * 32 + "abcdefghijklmnopqrstuvwxyz234567".index(char)
    return value


def _mac(key: bytes, stamp: int, group: Address, member: Address) -> str:
    text = f"{_CONTEXT}\n{stamp}\n{group}\n{member}".lower()
    digest = hmac.new(key, text.encode("utf-8"), hashlib.sha256).digest()
    return _base32(digest[:_MAC_BYTES])


def make_tag(key: bytes, now: float, group: Address, member: Address) -> str:
    """
    The 11-character tag for mail from C{group} to C{member} sent at C{now}.

    @param key: the signing key (at least 16 bytes).
    @param now: POSIX time, seconds.
    """
    stamp = day_of(now)
    return _stamp_text(stamp) + _mac(key, stamp, group, member)


def _age_days(stamp: int, now: float) -> int:
    """Days from C{stamp} to C{now}, in -16384..16383 (negative: the future)."""
    age = (day_of(now) - stamp) % DAY_MODULUS
    return age - DAY_MODULUS if age >= DAY_MODULUS // 2 else age


def verify_tag(
    tag: str,
    group: Address,
    member: Address,
    keys: Iterable[bytes],
    now: float,
    max_age: float,
) -> BounceCheck:
    """
    Check C{tag} (any case) for mail from C{group} to C{member}.

    @param max_age: seconds a tag stays valid (C{verp_max_age}), counted in
        whole days from the day stamp.
    @return: L{BounceCheck.SIGNED} (a key made it and it is recent),
        L{BounceCheck.EXPIRED} (a key made it, too long ago, or more than a
        day ahead) or L{BounceCheck.BAD_TAG} (no key made it).
    """
    tag = tag.lower()
    if not _TAG.match(tag):
        return BounceCheck.BAD_TAG
    stamp = _stamp_value(tag[:_DAY_CHARS])
    mac = tag[_DAY_CHARS:]
    if not any(hmac.compare_digest(_mac(key, stamp, group, member), mac) for key in keys):
        return BounceCheck.BAD_TAG
    return BounceCheck.SIGNED if _fresh(stamp, now, max_age) else BounceCheck.EXPIRED


def _fresh(stamp: int, now: float, max_age: float) -> bool:
    age = _age_days(stamp, now)
    return -1 <= age <= math.ceil(max_age / DAY)


def _fits(local: str) -> bool:
    return len(local.encode("utf-8")) <= MAX_LOCAL_PART


def sign_verp(group: Address, member: Address, key: bytes, now: float) -> Address | None:
    """
    The signed VERP envelope sender for mail from C{group} to C{member}.

    @return: the full form C{LIST+LOCAL=DOMAIN=TAG@SITE} when its local part
        is at most 64 octets (RFC 5321 §4.5.3.1.1) and needs no quoting;
        else the short form C{LIST+TAG@SITE}; C{None} when even that is too
        long (a list local part over 52 octets): the caller sends from the
        group's address itself, as GroupServer does without XVERP.
    """
    tag = make_tag(key, now, group, member)
    full = f"{group.local}+{member.local}={member.domain}={tag}"
    plain = not group.local.startswith('"') and _DOT_ATOM.match(member.local) is not None
    if plain and not member.domain.startswith("[") and _fits(full):
        return Address(full, group.domain)
    short = f"{group.local}+{tag}"
    if not group.local.startswith('"') and _fits(short):
        return Address(short, group.domain)
    return None


@attrs.frozen
class VerpAddress:
    """
    A bounce address, read by L{parse_verp}.

    @ivar group: the group's list address.
    @ivar member: the member's address; C{None} in the short form.
    @ivar tag: the tag, lowercased; C{None} in the unsigned form.
    """

    group: Address
    member: Address | None
    tag: str | None


def parse_verp(address: Address) -> VerpAddress | None:
    """
    Read a bounce address in any of the three forms (see the module
    docstring), or C{None} when C{address} is none of them. The tag is not
    checked here (L{verify_tag}).
    """
    list_local, plus, rest = address.local.partition("+")
    if not plus or not list_local:
        return None
    group = Address(list_local, address.domain)
    if _TAG.match(rest.lower()):
        return VerpAddress(group, None, rest.lower())
    body, eq, tag = rest.rpartition("=")
    if eq and _TAG.match(tag.lower()):
        user_local, eq, user_domain = body.rpartition("=")
        if not eq or not user_local or "." not in user_domain:
            return None
        try:
            member = parse_mailbox(f"{user_local}@{user_domain}")
        except AddressError:
            return None
        return VerpAddress(group, member, tag.lower())
    unsigned = decode_xverp(address)
    if unsigned is None:
        return None
    return VerpAddress(unsigned[0], unsigned[1], None)


@attrs.frozen
class VerpKeys:
    """
    The keys of a key file: the first signs, all verify.

    @ivar keys: at least one, each at least 16 bytes.
    @ivar created: when the key file was made (POSIX seconds): its
        C{# created YYYY-MM-DD} line, which gsmail writes when it makes the
        file, else the file's modification time.
    """

    keys: tuple[bytes, ...] = attrs.field(repr=False)
    created: float

    @classmethod
    def read(cls, path: str) -> VerpKeys:
        """
        Read the key file: one key a line in hex (at least 32 hex digits),
        C{#} comments and blank lines ignored. Blocking (start-up only).

        @raise VerpKeyError: it cannot be read, or holds no usable key.
        """
        try:
            with open(path, encoding="ascii", errors="replace") as f:
                text = f.read(1 << 16)
                mtime = os.fstat(f.fileno()).st_mtime
        except OSError as e:
            raise VerpKeyError(f"{path}: cannot read: {e.strerror or e}") from None
        keys: list[bytes] = []
        created: float | None = None
        for number, line in enumerate(text.splitlines(), start=1):
            line = line.strip()
            if not line:
                continue
            if line.startswith("#"):
                m = _CREATED.match(line)
                if m is not None and created is None:
                    try:
                        day = datetime.date.fromisoformat(m.group(1))
                    except ValueError:
                        continue
                    created = datetime.datetime.combine(
                        day, datetime.time(), datetime.UTC
                    ).timestamp()
                continue
            try:
                key = bytes.fromhex(line)
            except ValueError:
                raise VerpKeyError(f"{path}: line {number}: not a key in hex") from None
            if len(key) < MIN_KEY_BYTES:
                raise VerpKeyError(
                    f"{path}: line {number}: a key needs at least {MIN_KEY_BYTES} bytes"
                    f" ({2 * MIN_KEY_BYTES} hex digits)"
                )
            keys.append(key)
        if not keys:
            raise VerpKeyError(f"{path}: no key in the file")
        if os.name == "posix":
            try:
                mode = os.stat(path).st_mode
            except OSError:
                mode = 0
            if mode & 0o077:
                log.warn(
                    "VERP key file {path} can be read by others (mode {mode:o}); chmod 600 it",
                    path=path,
                    mode=mode & 0o777,
                )
        return cls(tuple(keys), mtime if created is None else created)

    @classmethod
    def read_or_make(cls, path: str, now: float) -> VerpKeys:
        """
        Read the key file, or make it with a new random key (mode 0600,
        written to a temporary file, synced and renamed) when there is none.
        Blocking (start-up only, after privileges are dropped so the file
        belongs to the user gsmail runs as).

        @raise VerpKeyError: it cannot be read or made.
        """
        if os.path.lexists(path):
            return cls.read(path)
        directory = os.path.dirname(os.path.abspath(path))
        today = datetime.datetime.fromtimestamp(now, datetime.UTC).date().isoformat()
        text = (
            "# gsmail's VERP signing keys (docs/outbound.md): the first signs, all verify.\n"
            f"# created {today}\n"
            f"{secrets.token_hex(_GENERATED_KEY_BYTES)}\n"
        )
        temporary = os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}.new")
        try:
            os.makedirs(directory, exist_ok=True)
            fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.write(fd, text.encode("ascii"))
                os.fsync(fd)
            finally:
                os.close(fd)
            try:
                os.link(temporary, path)  # never replaces a file made meanwhile
            except FileExistsError:
                pass
            finally:
                os.unlink(temporary)
            dir_fd = os.open(directory, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except OSError as e:
            raise VerpKeyError(f"{path}: cannot make the key file: {e.strerror or e}") from None
        log.info("Made a new VERP signing key file {path}", path=path)
        return cls.read(path)


class Clock(Protocol):
    """What L{VerpPolicy} needs of a clock (a reactor's C{IReactorTime} has it)."""

    def seconds(self) -> float:
        """POSIX time, seconds."""


class WallClock:
    """The system's clock, for C{smtp2gs}, which has no reactor clock to share."""

    def seconds(self) -> float:
        """POSIX time, seconds."""
        return time.time()


#: C{unsigned_until} values: accept unsigned bounce addresses always / never.
ALWAYS: Final = math.inf
NEVER: Final = -math.inf


def unsigned_until(setting: str, *, signing: bool) -> float | None:
    """
    The end of the window for unsigned bounce addresses, from the option
    C{verp_unsigned_until}.

    @param setting: C{always}, C{never}, a date C{YYYY-MM-DD} (the window
        ends at the end of that day, UTC), or C{auto}: L{ALWAYS} when gsmail
        does not make every VERP sender itself (C{signing} false: no
        submission listener, or C{relayhost_xverp}, where the smarthost
        makes unsigned ones), else C{None}: the key file's creation plus
        C{verp_max_age} (L{VerpPolicy.load}).
    @raise ValueError: another value.
    """
    if setting == "always" or (setting == "auto" and not signing):
        return ALWAYS
    if setting == "never":
        return NEVER
    if setting == "auto":
        return None
    day = datetime.date.fromisoformat(setting) + datetime.timedelta(days=1)
    return datetime.datetime.combine(day, datetime.time(), datetime.UTC).timestamp()


@attrs.define
class VerpPolicy:
    """
    How this site makes and checks bounce addresses.

    @ivar clock: the time (POSIX seconds).
    @ivar max_age: seconds a signed address stays valid (C{verp_max_age}).
    @ivar unsigned_until: POSIX seconds until which unsigned addresses are
        accepted (L{ALWAYS}, L{NEVER}), or C{None}: the key file's creation
        plus C{max_age}.
    @ivar key_file: the key file, or C{""}: no keys (nothing is signed; signed
        addresses cannot be checked).
    @ivar keys: once loaded.
    @ivar key_error: why the keys could not be read (C{smtp2gs}, which does
        not fail because of them until a signed address comes).
    """

    clock: Clock = attrs.field(repr=False)
    max_age: float = 14 * DAY
    unsigned_until: float | None = None
    key_file: str = ""
    keys: VerpKeys | None = None
    key_error: str = ""

    def load(self, *, make: bool) -> None:
        """
        Read the key file, or make it when C{make} and it does not exist
        (without C{make}, a key file that does not exist means no keys).
        Blocking (start-up only).

        @raise VerpKeyError: it cannot be read or made.
        """
        if not self.key_file:
            return
        if make:
            self.keys = VerpKeys.read_or_make(self.key_file, self.clock.seconds())
        elif os.path.lexists(self.key_file):
            self.keys = VerpKeys.read(self.key_file)

    def unsigned_accepted(self) -> bool:
        """
        Whether an unsigned bounce address is accepted now. With C{auto}
        and no key file yet, gsmail has never signed: always.
        """
        if self.unsigned_until is None:
            until = ALWAYS if self.keys is None else self.keys.created + self.max_age
        else:
            until = self.unsigned_until
        return self.clock.seconds() < until

    def sender(self, group: Address, member: Address) -> Address:
        """
        The envelope sender for C{group}'s mail to C{member}: signed
        (L{sign_verp}) when there is a key; the unsigned XVERP form when
        there is none; the group's own address when the signed forms do not
        fit in 64 octets.
        """
        if self.keys is None:
            from gsmail.addresses import encode_xverp

            return encode_xverp(group, member)
        signed = sign_verp(group, member, self.keys.keys[0], self.clock.seconds())
        return group if signed is None else signed

    def route(self, recipient: Address) -> Route | None:
        """
        The BOUNCE route of C{recipient}, with its L{BounceCheck}, or C{None}
        when it is not a bounce address.
        """
        parsed = parse_verp(recipient)
        if parsed is None:
            return None
        if self.keys is None and self.key_error:
            check = BounceCheck.NO_KEY  # smtp2gs: retried until the file can be read
        elif parsed.tag is None:
            check = BounceCheck.UNSIGNED if self.unsigned_accepted() else BounceCheck.UNSIGNED_LATE
        elif self.keys is None:
            check = BounceCheck.NO_KEY
        elif parsed.member is None:
            stamp = _stamp_value(parsed.tag[:_DAY_CHARS])
            fresh = _fresh(stamp, self.clock.seconds(), self.max_age)
            check = BounceCheck.SIGNED_SHORT if fresh else BounceCheck.EXPIRED
        else:
            check = verify_tag(
                parsed.tag,
                parsed.group,
                parsed.member,
                self.keys.keys,
                self.clock.seconds(),
                self.max_age,
            )
        return Route(
            RouteKind.BOUNCE,
            recipient,
            group_address=parsed.group,
            member_address=parsed.member,
            bounce_check=check,
            bounce_tag=parsed.tag or "",
        )

    def match_member(self, route: Route, reported: Iterable[str]) -> Address | None:
        """
        For a short-form address (L{BounceCheck.SIGNED_SHORT}), the reported
        address whose hash is the tag's: the member gsmail sent to.

        @param reported: addresses a failure report names (any case).
        """
        if self.keys is None or route.group_address is None or not route.bounce_tag:
            return None
        for text in reported:
            try:
                candidate = parse_mailbox(text)
            except AddressError:
                continue
            check = verify_tag(
                route.bounce_tag,
                route.group_address,
                candidate,
                self.keys.keys,
                self.clock.seconds(),
                self.max_age,
            )
            if check is BounceCheck.SIGNED:
                return candidate
        return None
