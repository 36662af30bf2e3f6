"""
Tests for L{gsmail.addresses}: path parsing, the XVERP codec and routing.
"""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from gsmail.addresses import (
    Address,
    AddressError,
    ParameterError,
    RouteKind,
    UnsafeAddressError,
    decode_xverp,
    encode_xverp,
    is_helo_name,
    is_xtext,
    parse_number,
    parse_parameters,
    parse_path,
    route_recipient,
)

DOMAINS = ("groups.example.com",)


class ParsePathTests(SynchronousTestCase):
    """RFC 5321 §4.1.2 paths."""

    def test_simple(self) -> None:
        """A bracketed mailbox parses; the domain is lowercased, the local part kept."""
        self.assertEqual(
            parse_path("<Dev@Groups.Example.COM> SIZE=10", allow_null=False),
            (Address("Dev", "groups.example.com"), "SIZE=10"),
        )

    def test_null_sender(self) -> None:
        """<> is the null reverse-path, only where allowed."""
        self.assertEqual(parse_path("<>", allow_null=True), (None, ""))
        self.assertRaises(AddressError, parse_path, "<>", allow_null=False)

    def test_leading_space_and_bare(self) -> None:
        """'MAIL FROM: <a@b.c>' and a bare address are tolerated, as Postfix does."""
        self.assertEqual(parse_path(" <a@b.c>", allow_null=False)[0], Address("a", "b.c"))
        self.assertEqual(parse_path("a@b.c", allow_null=False)[0], Address("a", "b.c"))

    def test_quoted_local_part(self) -> None:
        """A quoted local part may hold spaces and '>'."""
        address, rest = parse_path('<"john >doe"@example.org> BODY=8BITMIME', allow_null=False)
        self.assertEqual(address, Address('"john >doe"', "example.org"))
        self.assertEqual(rest, "BODY=8BITMIME")

    def test_source_route_ignored(self) -> None:
        """An obsolete source route is accepted and dropped (RFC 5321 Appendix C)."""
        self.assertEqual(
            parse_path("<@relay.example:u@example.org>", allow_null=False)[0],
            Address("u", "example.org"),
        )

    def test_utf8(self) -> None:
        """UTF-8 addresses (RFC 6531) parse and report that they are not ASCII."""
        address = parse_path("<grüße@bücher.example>", allow_null=False)[0]
        assert address is not None
        self.assertFalse(address.is_ascii)

    def test_bad(self) -> None:
        """Malformed paths raise AddressError."""
        for text in [
            "<a@b.c",
            "<a@>",
            "<@b.c>",
            "<a b@c.d>",
            "<a@b.c>x",
            "<a..b@c.d>",
            "<" + "x" * 65 + "@b.c>",
            "<a@-b.c>",
            "",
            "<a@b.c\r\n>",
        ]:
            self.assertRaises(AddressError, parse_path, text, allow_null=False)

    def test_parameters(self) -> None:
        """ESMTP parameters: keywords uppercased, values kept."""
        self.assertEqual(
            parse_parameters("size=10 SMTPUTF8  body=8BITMIME"),
            {"SIZE": "10", "SMTPUTF8": None, "BODY": "8BITMIME"},
        )
        self.assertRaises(AddressError, parse_parameters, "SIZE=")
        self.assertRaises(AddressError, parse_parameters, "=10")


class XVERPTests(SynchronousTestCase):
    """The XVERP codec, as Postfix expands and smtp2gs decoded it."""

    def test_encode(self) -> None:
        """dev@site to alice@example.org gives dev+alice=example.org@site."""
        self.assertEqual(
            encode_xverp(Address("dev", "groups.example.com"), Address("alice", "example.org")),
            Address("dev+alice=example.org", "groups.example.com"),
        )

    def test_decode(self) -> None:
        """The bounce address names the group and the member."""
        self.assertEqual(
            decode_xverp(Address("dev+alice=example.org", "groups.example.com")),
            (Address("dev", "groups.example.com"), Address("alice", "example.org")),
        )

    def test_not_xverp(self) -> None:
        """Plain and plus addresses without a member domain are not bounces."""
        for local in ["dev", "dev+tag", "+a=b.c", "dev+=b.c", "dev+a=", "dev+a=nodot"]:
            self.assertIsNone(decode_xverp(Address(local, "groups.example.com")), local)

    @given(
        st.from_regex(r"[a-z0-9][a-z0-9.\-]{0,15}[a-z0-9]", fullmatch=True).filter(
            lambda s: ".." not in s
        ),
        st.from_regex(r"[a-z0-9_=][a-z0-9_=.+]{0,15}[a-z0-9_=]", fullmatch=True).filter(
            lambda s: ".." not in s
        ),
        st.from_regex(r"[a-z0-9]{1,10}\.[a-z]{2,6}", fullmatch=True),
    )
    def test_round_trip(self, group: str, user: str, domain: str) -> None:
        """decode(encode(group, member)) gives back the group and the member."""
        if "+" in group:
            return
        list_address = Address(group, "groups.example.com")
        member = Address(user, domain)
        self.assertEqual(decode_xverp(encode_xverp(list_address, member)), (list_address, member))


class RouteTests(SynchronousTestCase):
    """Where a recipient goes."""

    def test_foreign_domain(self) -> None:
        """A domain the site does not receive for is refused: never an open relay."""
        self.assertIs(
            route_recipient(Address("a", "example.org"), DOMAINS, "p-").kind, RouteKind.REJECT_RELAY
        )

    def test_relay_prefix(self) -> None:
        """The relay prefix (case-insensitive) goes to the relay page."""
        self.assertIs(
            route_recipient(Address("P-abc", "groups.example.com"), DOMAINS, "p-").kind,
            RouteKind.RELAY,
        )
        self.assertIs(
            route_recipient(Address("p-abc", "groups.example.com"), DOMAINS, "").kind,
            RouteKind.GROUP,
        )

    def test_bounce(self) -> None:
        """An XVERP address goes to the bounce page with group and member."""
        route = route_recipient(Address("dev+bob=example.org", "groups.example.com"), DOMAINS, "p-")
        self.assertIs(route.kind, RouteKind.BOUNCE)
        self.assertEqual(str(route.group_address), "dev@groups.example.com")
        self.assertEqual(str(route.member_address), "bob@example.org")

    def test_group(self) -> None:
        """Anything else is looked up as a group."""
        self.assertIs(
            route_recipient(Address("dev", "groups.example.com"), DOMAINS, "p-").kind,
            RouteKind.GROUP,
        )


class AttackTests(SynchronousTestCase):
    """What port 25 gets from attackers (issue "Port 25 under attack")."""

    def test_trailing_dots_refused(self) -> None:
        """C{a@domain.} and C{a@domain..} are refused like C{groups..example.com}."""
        for text in [
            "<example@groups.example.com.>",
            "<example@groups.example.com..>",
            "<example@groups.example.com.....>",
            "<example@groups..example.com>",
            "example@groups.example.com..",
        ]:
            self.assertRaises(AddressError, parse_path, text, allow_null=False)

    def test_unsafe_characters(self) -> None:
        """
        An address with a control or line-breaking character is refused with
        L{UnsafeAddressError} (553), even where RFC 6531 allows UTF-8.
        """
        for char in ["\u2028", "\u2029", "\x85", "\x1b", "\x00", "\x7f", "\t", "\u200b"]:
            for text in [f"<a{char}b@example.org>", f"<ab@exam{char}ple.org>", f"a{char}@x.org"]:
                with self.subTest(text=text):
                    self.assertRaises(UnsafeAddressError, parse_path, text, allow_null=False)
        self.assertEqual(
            parse_path("<grüße@bücher.example>", allow_null=False)[0],
            Address("grüße", "bücher.example"),
        )

    def test_bare_postmaster(self) -> None:
        """C{<postmaster>} (any case) parses where allowed, with no domain (RFC 5321 §4.1.1.3)."""
        for text in ["<postmaster>", "<PostMaster> ", "postmaster", "<@relay.example:postmaster>"]:
            address, _ = parse_path(text, allow_null=False, allow_postmaster=True)
            assert address is not None
            self.assertEqual((address.local.lower(), address.domain), ("postmaster", ""))
            self.assertEqual(str(address).lower(), "postmaster")
        self.assertRaises(AddressError, parse_path, "<postmaster>", allow_null=False)
        self.assertRaises(
            AddressError, parse_path, "<postmistress>", allow_null=False, allow_postmaster=True
        )

    def test_parse_number(self) -> None:
        """Only 1 to 20 ASCII digits are a number; C{²}, C{①}, C{٣} are not."""
        self.assertEqual(parse_number("SIZE", "0123", 10**20), 123)
        for value in ["²", "①", "٣٣", "１２", "", "-1", "+1", "1.0", " 1", "1" * 21, None]:
            with self.subTest(value=value):
                self.assertRaises(ParameterError, parse_number, "SIZE", value, 10**20)
        self.assertRaises(ParameterError, parse_number, "SIZE", "11", 10)

    def test_parameter_values(self) -> None:
        """Parameter values may be UTF-8 and hold C{=}, but no control characters."""
        self.assertEqual(
            parse_parameters("XVERP=+= ENVID=grüße  SMTPUTF8"),
            {"XVERP": "+=", "ENVID": "grüße", "SMTPUTF8": None},
        )
        for text in ["ENVID=a\x1bb", "ENVID=\u2028", "SIZE=1\x1cBODY=8BITMIME", "K\u0130Y=1", "=1"]:
            with self.subTest(text=text):
                self.assertRaises(ParameterError, parse_parameters, text)

    def test_helo_names(self) -> None:
        """A HELO name is a domain or an IPv4/IPv6 address literal (RFC 5321 §4.1.1.1)."""
        for name in ["mx.example.org", "localhost", "[192.0.2.1]", "[IPv6:2001:db8::1]"]:
            self.assertTrue(is_helo_name(name), name)
        for name in [
            "bad(name)",
            "é.example",
            "my_host",
            "mx.example.org.",
            "[999.1.1.1]",
            "[IPv6:192.0.2.1]",
            "[2001:db8::1]",
            "-a.example",
            "a" * 64,
            "",
        ]:
            self.assertFalse(is_helo_name(name), name)

    def test_xtext(self) -> None:
        """xtext (RFC 3461 §4): printable ASCII, C{+} and C{=} only as C{+HH}."""
        self.assertTrue(is_xtext("abc+2B+3Dx"))
        for value in ["a=b", "a+b", "a+2b", "é", "a b", "a\x1b"]:
            self.assertFalse(is_xtext(value), value)

    def test_postmaster_route(self) -> None:
        """
        Postmaster is the route table's (L{gsmail.routes}, which the daemon
        asks first): route_recipient refuses it at another domain as
        relaying, and reads it at a site domain as any group.
        """
        self.assertIs(
            route_recipient(Address("postmaster", "example.net"), DOMAINS, "p-").kind,
            RouteKind.REJECT_RELAY,
        )
        self.assertIs(
            route_recipient(Address("postmaster", "groups.example.com"), DOMAINS, "p-").kind,
            RouteKind.GROUP,
        )
