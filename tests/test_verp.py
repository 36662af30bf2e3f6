"""
Tests for L{gsmail.verp}: the signed VERP codec, the key file and the
policy that routes bounce addresses.
"""

from __future__ import annotations

import os
import stat

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.logger import LogEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from gsmail.addresses import (
    MAX_LOCAL_PART,
    Address,
    BounceCheck,
    RouteKind,
    parse_mailbox,
    route_recipient,
)
from gsmail.verp import (
    ALWAYS,
    DAY,
    NEVER,
    TAG_LENGTH,
    VerpKeyError,
    VerpKeys,
    VerpPolicy,
    make_tag,
    parse_verp,
    sign_verp,
    unsigned_until,
    verify_tag,
)

KEY = bytes(range(32))
OLD_KEY = b"\x01" * 32
#: 2023-11-14 22:13:20 UTC.
NOW = 1_700_000_000.0
GROUP = Address("dev", "groups.example.com")
ALICE = Address("alice", "example.org")
MAX_AGE = 14 * DAY


def policy(clock: Clock, *keys: bytes, until: float | None = NEVER) -> VerpPolicy:
    """A policy with C{keys} (the first signs), created at C{NOW}."""
    return VerpPolicy(
        clock, max_age=MAX_AGE, unsigned_until=until, keys=VerpKeys(keys or (KEY,), NOW)
    )


def at(seconds: float) -> Clock:
    clock = Clock()
    clock.advance(seconds)
    return clock


class CodecTests(SynchronousTestCase):
    """Making and reading signed addresses."""

    def test_full_form(self) -> None:
        """
        The full form is the XVERP address with the tag after a last C{=}:
        11 lowercase base32 characters; it reads back to group and member.
        """
        address = sign_verp(GROUP, ALICE, KEY, NOW)
        assert address is not None
        local = address.local
        self.assertTrue(local.startswith("dev+alice=example.org="), local)
        tag = local.rpartition("=")[2]
        self.assertEqual(len(tag), TAG_LENGTH)
        self.assertRegex(tag, r"\A[a-z2-7]+\Z")
        self.assertEqual(address.domain, "groups.example.com")
        parsed = parse_verp(address)
        assert parsed is not None
        self.assertEqual((parsed.group, parsed.member, parsed.tag), (GROUP, ALICE, tag))
        self.assertEqual(verify_tag(tag, GROUP, ALICE, [KEY], NOW, MAX_AGE), BounceCheck.SIGNED)

    def test_unsigned_form_reads_as_before(self) -> None:
        """C{dev+alice=example.org@site} is read as Postfix's XVERP form, without a tag."""
        parsed = parse_verp(Address("dev+alice=example.org", "groups.example.com"))
        assert parsed is not None
        self.assertEqual((parsed.group, parsed.member, parsed.tag), (GROUP, ALICE, None))

    def test_member_with_plus_and_equals(self) -> None:
        """A member's local part may hold C{+} and C{=}; it reads back whole."""
        member = Address("a+lists=x", "example.org")
        address = sign_verp(GROUP, member, KEY, NOW)
        assert address is not None
        parsed = parse_verp(address)
        assert parsed is not None
        self.assertEqual(parsed.member, member)

    def test_not_bounce_addresses(self) -> None:
        """A group address, or a C{+} address that is no form, is not a bounce address."""
        for local in ("dev", "dev+", "+alice=example.org", "dev+alice", "dev+alice=nodot"):
            self.assertIsNone(parse_verp(Address(local, "groups.example.com")), local)

    def test_tampered(self) -> None:
        """
        Changing the member, the group, any character of the tag, or signing
        with another key, gives a bad tag.
        """
        address = sign_verp(GROUP, ALICE, KEY, NOW)
        assert address is not None
        tag = address.local.rpartition("=")[2]
        other = Address("bob", "example.org")
        self.assertEqual(verify_tag(tag, GROUP, other, [KEY], NOW, MAX_AGE), BounceCheck.BAD_TAG)
        self.assertEqual(
            verify_tag(tag, Address("ann", "groups.example.com"), ALICE, [KEY], NOW, MAX_AGE),
            BounceCheck.BAD_TAG,
        )
        self.assertEqual(
            verify_tag(tag, GROUP, ALICE, [OLD_KEY], NOW, MAX_AGE), BounceCheck.BAD_TAG
        )
        for i in range(TAG_LENGTH):
            changed = tag[:i] + ("a" if tag[i] != "a" else "b") + tag[i + 1 :]
            check = verify_tag(changed, GROUP, ALICE, [KEY], NOW, MAX_AGE)
            # A changed day stamp can only ever verify as what it is not: a
            # tag made on another day. It does not verify here.
            self.assertEqual(check, BounceCheck.BAD_TAG, changed)
        for bad in ("", "short", tag + "a", tag[:-1] + "1", tag[:-1] + "!"):
            self.assertEqual(
                verify_tag(bad, GROUP, ALICE, [KEY], NOW, MAX_AGE), BounceCheck.BAD_TAG
            )

    def test_expiry(self) -> None:
        """
        A tag is valid for C{max_age} (14 whole days after its day), and a
        day ahead (clocks a little apart); older or further ahead: expired.
        """
        tag = make_tag(KEY, NOW, GROUP, ALICE)

        def check(now: float) -> BounceCheck:
            return verify_tag(tag, GROUP, ALICE, [KEY], now, MAX_AGE)

        self.assertEqual(check(NOW + 14 * DAY), BounceCheck.SIGNED)
        self.assertEqual(check(NOW + 15 * DAY), BounceCheck.EXPIRED)
        self.assertEqual(check(NOW - 1 * DAY), BounceCheck.SIGNED)
        self.assertEqual(check(NOW - 2 * DAY), BounceCheck.EXPIRED)
        # After 32768 days the stamp repeats; half-way it reads as the future.
        self.assertEqual(check(NOW + 20000 * DAY), BounceCheck.EXPIRED)

    def test_case_folded_by_the_remote_mta(self) -> None:
        """
        Some MTAs lowercase (or uppercase) the address they bounce to: the tag
        is base32 in one case and the hash is over lowercased addresses, so it
        still verifies, and the member is read as it came.
        """
        member = Address("Alice.Smith", "Example.ORG".lower())
        address = sign_verp(GROUP, member, KEY, NOW)
        assert address is not None
        clock = at(NOW)
        for local in (address.local.lower(), address.local.upper()):
            route = policy(clock).route(Address(local, "groups.example.com"))
            assert route is not None
            self.assertEqual(route.bounce_check, BounceCheck.SIGNED, local)
            assert route.member_address is not None
            self.assertEqual(str(route.member_address).lower(), "alice.smith@example.org")

    def test_64_octet_limit_short_form(self) -> None:
        """
        When the full form would pass 64 octets (RFC 5321 §4.5.3.1.1), the
        short form C{LIST+TAG} is used; it names no member, and the tag binds
        it to the member the report names.
        """
        member = Address("a.very.long.first.name.and.last.name", "a-long-domain.example.org")
        address = sign_verp(GROUP, member, KEY, NOW)
        assert address is not None
        self.assertLessEqual(len(address.local.encode()), MAX_LOCAL_PART)
        self.assertRegex(address.local, r"\Adev\+[a-z2-7]{11}\Z")
        clock = at(NOW)
        route = policy(clock).route(address)
        assert route is not None
        self.assertEqual(route.bounce_check, BounceCheck.SIGNED_SHORT)
        self.assertIsNone(route.member_address)
        self.assertEqual(
            policy(clock).match_member(route, ["bob@example.org", str(member).upper()]),
            Address(member.local.upper(), member.domain),
        )
        self.assertIsNone(policy(clock).match_member(route, ["bob@example.org"]))

    def test_full_form_fits_exactly(self) -> None:
        """A full form of exactly 64 octets is used; one more octet gives the short form."""
        fixed = len("dev+") + len("=example.org=") + TAG_LENGTH
        member = Address("m" * (MAX_LOCAL_PART - fixed), "example.org")
        address = sign_verp(GROUP, member, KEY, NOW)
        assert address is not None
        self.assertEqual(len(address.local), MAX_LOCAL_PART)
        self.assertIn("=", address.local)
        longer = sign_verp(GROUP, Address(member.local + "m", "example.org"), KEY, NOW)
        assert longer is not None
        self.assertNotIn("=", longer.local)

    def test_quoted_and_literal_members_use_the_short_form(self) -> None:
        """A quoted local part or an address literal cannot sit inside a dot-atom: short form."""
        for member in (parse_mailbox('"john doe"@example.org'), Address("j", "[192.0.2.1]")):
            address = sign_verp(GROUP, member, KEY, NOW)
            assert address is not None
            self.assertRegex(address.local, r"\Adev\+[a-z2-7]{11}\Z")

    def test_list_too_long_for_any_form(self) -> None:
        """
        A list local part over 52 octets leaves no room for a tag: no VERP
        address (the caller sends from the group's own address), and the
        policy says so.
        """
        group = Address("g" * 53, "groups.example.com")
        self.assertIsNone(sign_verp(group, ALICE, KEY, NOW))
        self.assertIsNotNone(sign_verp(Address("g" * 52, "groups.example.com"), ALICE, KEY, NOW))
        self.assertEqual(policy(at(NOW)).sender(group, ALICE), group)

    @given(
        local=st.from_regex(r"[a-zA-Z0-9][a-zA-Z0-9._+=-]{0,40}[a-zA-Z0-9]", fullmatch=True),
        domain=st.from_regex(r"[a-z0-9]{1,20}\.[a-z]{2,6}", fullmatch=True),
        day=st.integers(min_value=0, max_value=40000),
    )
    def test_round_trip(self, local: str, domain: str, day: int) -> None:
        """Every signed address reads back to its group and member, and verifies."""
        if ".." in local:
            return
        member = Address(local, domain)
        now = day * DAY + 4000.0
        address = sign_verp(GROUP, member, KEY, now)
        assert address is not None
        self.assertLessEqual(len(address.local.encode()), MAX_LOCAL_PART)
        route = policy(at(now)).route(address)
        assert route is not None
        if route.member_address is None:
            self.assertEqual(route.bounce_check, BounceCheck.SIGNED_SHORT)
            self.assertEqual(policy(at(now)).match_member(route, [str(member)]), member)
        else:
            self.assertEqual(route.member_address, member)
            self.assertEqual(route.bounce_check, BounceCheck.SIGNED)


class PolicyTests(SynchronousTestCase):
    """Routing bounce addresses, the unsigned window and key rotation."""

    def test_route_recipient_uses_the_policy(self) -> None:
        """
        With a policy, signed addresses are BOUNCE routes with their check;
        anything else in the domain is a group.
        """
        clock = at(NOW)
        verp = policy(clock)
        address = verp.sender(GROUP, ALICE)
        route = route_recipient(address, ("groups.example.com",), "p-", verp)
        self.assertEqual((route.kind, route.bounce_check), (RouteKind.BOUNCE, BounceCheck.SIGNED))
        self.assertEqual((route.group_address, route.member_address), (GROUP, ALICE))
        forged = Address(
            address.local[:-1] + ("a" if address.local[-1] != "a" else "b"), GROUP.domain
        )
        route = route_recipient(forged, ("groups.example.com",), "p-", verp)
        self.assertEqual((route.kind, route.bounce_check), (RouteKind.BOUNCE, BounceCheck.BAD_TAG))
        route = route_recipient(GROUP, ("groups.example.com",), "p-", verp)
        self.assertEqual(route.kind, RouteKind.GROUP)

    def test_unsigned_window(self) -> None:
        """
        Unsigned addresses are accepted until C{unsigned_until}: by default
        (C{auto}) the key file's creation plus C{max_age}.
        """
        unsigned = Address("dev+alice=example.org", "groups.example.com")
        clock = at(NOW)
        verp = policy(clock, until=None)
        route = verp.route(unsigned)
        assert route is not None
        self.assertEqual(route.bounce_check, BounceCheck.UNSIGNED)
        clock.advance(MAX_AGE - 1)
        self.assertTrue(verp.unsigned_accepted())
        clock.advance(1)
        route = verp.route(unsigned)
        assert route is not None
        self.assertEqual(route.bounce_check, BounceCheck.UNSIGNED_LATE)
        self.assertTrue(policy(clock, until=ALWAYS).unsigned_accepted())
        self.assertFalse(policy(at(NOW), until=NEVER).unsigned_accepted())

    def test_unsigned_until_setting(self) -> None:
        """
        C{verp_unsigned_until}: a date ends at the end of that UTC day;
        C{auto} is C{always} when gsmail does not make every VERP sender.
        """
        self.assertEqual(unsigned_until("always", signing=True), ALWAYS)
        self.assertEqual(unsigned_until("never", signing=False), NEVER)
        self.assertEqual(unsigned_until("auto", signing=False), ALWAYS)
        self.assertIsNone(unsigned_until("auto", signing=True))
        self.assertEqual(unsigned_until("2023-11-14", signing=True), 1_700_006_400.0)
        self.assertRaises(ValueError, unsigned_until, "soon", signing=True)

    def test_rotation(self) -> None:
        """
        With a new key first and the old one after it, new addresses are
        signed with the new key and addresses the old key made still verify.
        """
        clock = at(NOW)
        old = policy(clock, OLD_KEY).sender(GROUP, ALICE)
        rotated = policy(clock, KEY, OLD_KEY)
        new = rotated.sender(GROUP, ALICE)
        self.assertNotEqual(old, new)
        for address in (old, new):
            route = rotated.route(address)
            assert route is not None
            self.assertEqual(route.bounce_check, BounceCheck.SIGNED)
        route = policy(clock, KEY).route(old)
        assert route is not None
        self.assertEqual(route.bounce_check, BounceCheck.BAD_TAG)

    def test_no_keys(self) -> None:
        """
        Without keys the unsigned form is made; a signed address cannot be
        checked (C{NO_KEY}); a key file that could not be read makes every
        bounce address C{NO_KEY} (smtp2gs: retried until it can).
        """
        clock = at(NOW)
        signed = policy(clock).sender(GROUP, ALICE)
        keyless = VerpPolicy(clock, unsigned_until=ALWAYS)
        self.assertEqual(
            str(keyless.sender(GROUP, ALICE)), "dev+alice=example.org@groups.example.com"
        )
        route = keyless.route(signed)
        assert route is not None
        self.assertEqual(route.bounce_check, BounceCheck.NO_KEY)
        keyless.key_error = "cannot read"
        route = keyless.route(Address("dev+alice=example.org", "groups.example.com"))
        assert route is not None
        self.assertEqual(route.bounce_check, BounceCheck.NO_KEY)

    def test_auto_window_without_key_file(self) -> None:
        """With C{auto} and no key file yet (smtp2gs before the daemon ran): unsigned accepted."""
        self.assertTrue(VerpPolicy(at(NOW), unsigned_until=None).unsigned_accepted())


class KeyFileTests(SynchronousTestCase):
    """The key file: made at the first start, mode 0600, never logged."""

    def setUp(self) -> None:
        self.events: list[LogEvent] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def test_made_once(self) -> None:
        """
        A missing key file is made (with its directory) with one 256-bit key,
        mode 0600, and a C{created} line; read again, it gives the same key.
        """
        path = os.path.join(self.mktemp(), "state", "verp.key")
        keys = VerpKeys.read_or_make(path, NOW)
        self.assertEqual(len(keys.keys), 1)
        self.assertEqual(len(keys.keys[0]), 32)
        self.assertEqual(keys.created, 1_699_920_000.0)  # 2023-11-14 00:00 UTC
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
        self.assertEqual(VerpKeys.read_or_make(path, NOW + DAY), keys)
        self.assertEqual(os.listdir(os.path.dirname(path)), ["verp.key"])
        text = " ".join(str(e) for e in self.events)
        self.assertIn("Made a new VERP signing key file", text)
        self.assertNotIn(keys.keys[0].hex(), text)
        self.assertNotIn(keys.keys[0].hex(), repr(keys))

    def test_several_keys_and_comments(self) -> None:
        """Keys are read in order; comments and blank lines are skipped; the mtime is the date."""
        path = self.mktemp()
        with open(path, "w") as f:
            f.write(f"# new\n{KEY.hex()}\n\n  {OLD_KEY.hex().upper()}  \n")
        os.chmod(path, 0o600)
        os.utime(path, (NOW, NOW))
        keys = VerpKeys.read(path)
        self.assertEqual(keys, VerpKeys((KEY, OLD_KEY), NOW))

    def test_bad_files(self) -> None:
        """
        A missing, empty, non-hex or short-key file is a L{VerpKeyError}
        naming the file and line, and never quoting the line.
        """
        directory = self.mktemp()
        os.makedirs(directory)
        cases = {
            "empty": "# nothing\n",
            "nothex": "this is not hex, secret-ish\n",
            "short": "00112233445566778899aabbccddee\n",
        }
        for name, text in cases.items():
            path = os.path.join(directory, name)
            with open(path, "w") as f:
                f.write(text)
            error = self.assertRaises(VerpKeyError, VerpKeys.read, path)
            self.assertIn(path, str(error))
            self.assertNotIn("secret-ish", str(error))
            self.assertNotIn(text.strip(), str(error))
        error = self.assertRaises(VerpKeyError, VerpKeys.read, os.path.join(directory, "none"))
        self.assertIn("cannot read", str(error))

    def test_readable_by_others_warns(self) -> None:
        """A key file others can read is used, with a warning to chmod 600 it."""
        path = self.mktemp()
        with open(path, "w") as f:
            f.write(KEY.hex() + "\n")
        os.chmod(path, 0o644)
        VerpKeys.read(path)
        self.assertTrue(any("chmod 600" in str(e.get("log_format")) for e in self.events))

    def test_cannot_make(self) -> None:
        """A key file that cannot be made is a L{VerpKeyError} (gsmail does not start)."""
        blocker = self.mktemp()
        with open(blocker, "w") as f:
            f.write("a file, not a directory")
        error = self.assertRaises(
            VerpKeyError, VerpKeys.read_or_make, os.path.join(blocker, "verp.key"), NOW
        )
        self.assertIn("cannot make the key file", str(error))

    def test_policy_load_makes_the_file(self) -> None:
        """L{VerpPolicy.load} makes the file (C{make}) and then signs with its key."""
        path = os.path.join(self.mktemp(), "verp.key")
        clock = at(NOW)
        verp = VerpPolicy(clock, unsigned_until=None, key_file=path)
        verp.load(make=False)
        self.assertIsNone(verp.keys)
        verp.load(make=True)
        assert verp.keys is not None
        route = verp.route(verp.sender(GROUP, ALICE))
        assert route is not None
        self.assertEqual(route.bounce_check, BounceCheck.SIGNED)


class ParseFuzzTests(SynchronousTestCase):
    """Whatever a stranger puts in RCPT TO, reading it as a bounce address never fails."""

    @given(local=st.text(alphabet="abcxyz234567+=.-_ZA\u00e9", min_size=1, max_size=64))
    def test_never_raises(self, local: str) -> None:
        """L{VerpPolicy.route} returns a route or C{None} for any local part."""
        route = policy(at(NOW)).route(Address(local, "groups.example.com"))
        if route is not None:
            self.assertIsNotNone(route.group_address)
            self.assertIn(
                route.bounce_check,
                (
                    BounceCheck.BAD_TAG,
                    BounceCheck.EXPIRED,
                    BounceCheck.UNSIGNED_LATE,
                    BounceCheck.SIGNED_SHORT,
                    BounceCheck.SIGNED,
                ),
            )
