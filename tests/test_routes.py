"""
Tests for L{gsmail.routes}: the route file's format, matching, templates
and the policy rules (pure code).
"""

from __future__ import annotations

import os
from email.parser import BytesHeaderParser

from twisted.trial.unittest import SynchronousTestCase

from gsmail.addresses import Address
from gsmail.routes import (
    RouteTableError,
    Substitutions,
    check_policy,
    expand,
    glob_matches,
    load_routes,
    parse_routes,
)

DOMAINS = ("groups.example.com", "lists.example.com")

EXAMPLE = """
[defaults]
max_size = 1M

[support@groups.example.com]
forward = alice@example.net, bob@example.org

[old-dev@*]
group = dev

[noreply@groups.example.com]
reject = 550 5.7.1 Nobody reads this address

[~(?P<list>[a-z]+)-archive@groups\\.example\\.com]
archive = /var/mail/${list}/${date:%Y-%m}

[drop@groups.example.com]
forward =
"""


def header(text: bytes) -> object:
    return BytesHeaderParser().parsebytes(text)


class ParseTests(SynchronousTestCase):
    """The file's format."""

    def setUp(self) -> None:
        self.table = parse_routes(EXAMPLE, "routes.ini", domains=DOMAINS)

    def lookup(self, address: str) -> str | None:
        local, _, domain = address.rpartition("@")
        found = self.table.lookup(Address(local, domain))
        return None if found is None else found.entry.name

    def test_first_match_in_file_order(self) -> None:
        """Each address form matches what it says, in file order; others match nothing."""
        self.assertEqual(self.lookup("support@groups.example.com"), "support@groups.example.com")
        self.assertEqual(self.lookup("SUPPORT@Groups.Example.Com"), "support@groups.example.com")
        self.assertEqual(self.lookup("old-dev@lists.example.com"), "old-dev@*")
        self.assertEqual(
            self.lookup("dev-archive@groups.example.com"),
            "~(?P<list>[a-z]+)-archive@groups\\.example\\.com",
        )
        self.assertIsNone(self.lookup("dev@groups.example.com"))
        self.assertIsNone(self.lookup("support@lists.example.com"))

    def test_builtin_postmaster_and_abuse(self) -> None:
        """postmaster@* and abuse@* come last, as postmaster mail; bare postmaster matches."""
        for address in ["postmaster@groups.example.com", "abuse@lists.example.com"]:
            local, _, domain = address.partition("@")
            found = self.table.lookup(Address(local, domain))
            assert found is not None
            self.assertTrue(found.entry.postmaster and found.entry.builtin)
        found = self.table.lookup(Address("PostMaster", ""))
        assert found is not None
        self.assertEqual(found.entry.name, "postmaster@*")

    def test_site_overrides_builtin(self) -> None:
        """A section of the file for postmaster replaces the built-in one."""
        table = parse_routes("[postmaster@*]\nforward = admin@example.net\n", domains=DOMAINS)
        names = [e.name for e in table.entries]
        self.assertEqual(names, ["postmaster@*", "abuse@*"])
        self.assertEqual(table.entries[0].forward, ("admin@example.net",))

    def test_actions(self) -> None:
        """The values of the actions, the defaults merged in, a drop."""
        entries = {e.name: e for e in self.table.entries}
        self.assertEqual(
            entries["support@groups.example.com"].forward,
            ("alice@example.net", "bob@example.org"),
        )
        self.assertEqual(entries["support@groups.example.com"].policy.max_size, 1024 * 1024)
        reject = entries["noreply@groups.example.com"].reject
        assert reject is not None
        self.assertEqual(
            (reject.code, reject.enhanced, reject.text),
            (550, "5.7.1", "Nobody reads this address"),
        )
        self.assertTrue(entries["drop@groups.example.com"].drops)
        self.assertFalse(entries["support@groups.example.com"].drops)
        self.assertTrue(self.table.uses_queue)

    def test_group_template(self) -> None:
        """A pattern's groups fill the group id."""
        table = parse_routes("[~old-(.+)@groups\\.example\\.com]\ngroup = ${1}\n", domains=DOMAINS)
        found = table.lookup(Address("old-dev", "groups.example.com"))
        assert found is not None
        self.assertEqual(found.group_id, "dev")

    def test_errors(self) -> None:
        """Each mistake is one line naming the file, the section and the key."""
        cases = [
            ("[a@groups.example.com]\n", "no action"),
            ("[a@groups.example.com]\ngroup = dev\ncolour = blue\n", "colour: unknown key"),
            ("[a@groups.example.com]\nreject = 250 2.0.0 fine\n", "reject: expected"),
            ("[a@groups.example.com]\nreject = 550 4.7.1 no\n", "reject: expected"),
            ("[a@groups.example.com]\nreject = 550 5.7.1 no\ngroup = x\n", "cannot be combined"),
            ("[a@example.net]\ngroup = x\n", "not one of the site's domains"),
            ("[nonsense]\ngroup = x\n", "expected local@domain"),
            ("[~(unclosed@x]\ngroup = x\n", "not a regular expression"),
            ("[a@groups.example.com]\nforward = not an address\n", "forward: not an address"),
            ("[a@groups.example.com]\ngroup = ${nope}\n", "unknown substitution ${nope}"),
            ("[a@groups.example.com]\nnntp = http://x/y\n", "nntp: expected news://"),
            ("[a@groups.example.com]\nhandler = no-colon\n", "handler: expected"),
            ("[a@groups.example.com]\ngroup = x\nmax_size = lots\n", "max_size: expected"),
            (
                "[a@groups.example.com]\ngroup = x\nset_header = Received: x\n",
                "cannot be rewritten",
            ),
            ("[defaults]\ngroup = x\n", "not allowed in [defaults]"),
            ("[a@groups.example.com]\ngroup = x\n[a@groups.example.com]\ngroup = y\n", "already"),
            (
                "[a@groups.example.com]\nforward = a@groups.example.com\n",
                "routes back to this route",
            ),
        ]
        for text, problem in cases:
            with self.subTest(text=text):
                error = self.assertRaises(
                    RouteTableError, parse_routes, text, "r.ini", domains=DOMAINS
                )
                self.assertIn(problem, str(error))
                self.assertTrue(str(error).startswith("r.ini"), str(error))
                self.assertNotIn("\n", str(error))

    def test_load(self) -> None:
        """No file: the built-in routes; a missing file: an error naming it."""
        self.assertEqual(
            [e.name for e in load_routes("", DOMAINS).entries], ["postmaster@*", "abuse@*"]
        )
        missing = os.path.join(self.mktemp(), "routes.ini")
        error = self.assertRaises(RouteTableError, load_routes, missing, DOMAINS)
        self.assertIn(missing, str(error))


class TemplateTests(SynchronousTestCase):
    """C{${...}} substitutions."""

    def test_expand(self) -> None:
        """Every kind of substitution, and a cleaner applied to values only."""
        msg = header(b"Subject: Hello\nX-Tag: a/b\n\n")
        subs = Substitutions(
            {"sender": "a@example.org", "local": "dev", "1": "x"},
            msg,  # type: ignore[arg-type]
            now=86400 * 365,
            seqno=1234,
        )
        self.assertEqual(
            expand(
                "${local}/${1}/${seqno}/${seqno/100}/${date:%Y-%m-%d}/${header.X-Tag}/${subject}",
                subs,
            ),
            "dev/x/1234/12/1971-01-01/a/b/Hello",
        )
        self.assertEqual(expand("${header.X-Tag}/x", subs, lambda v: v.replace("/", "_")), "a_b/x")
        self.assertEqual(expand("${header.Missing}", subs), "")

    def test_header_values_one_line(self) -> None:
        """A folded or control-laden header value becomes one clean line."""
        msg = header(b"Subject: a\n\tb\x01c\n\n")
        self.assertEqual(expand("${subject}", Substitutions({}, msg)), "a b c")  # type: ignore[arg-type]

    def test_globs(self) -> None:
        """Address globs, any case; a bare domain covers its subdomains."""
        self.assertTrue(glob_matches(["*@example.com"], "Boss@Example.com"))
        self.assertTrue(glob_matches(["example.com"], "a@lists.example.com"))
        self.assertFalse(glob_matches(["example.com"], "a@badexample.com"))
        self.assertFalse(glob_matches(["boss@example.com"], "other@example.com"))


class PolicyTests(SynchronousTestCase):
    """Each rule refuses what it should and accepts the rest."""

    def check(
        self,
        rules: str,
        message: bytes,
        sender: str = "a@example.org",
        client: str = "192.0.2.1",
        text: str = "",
    ) -> object:
        table = parse_routes(f"[a@groups.example.com]\ngroup = x\n{rules}\n", domains=DOMAINS)
        policy = table.entries[0].policy
        head, _, body = message.partition(b"\n\n")
        return check_policy(
            policy,
            "a@groups.example.com",
            sender=sender,
            client=client,
            header=header(message),  # type: ignore[arg-type]
            size=len(message),
            body_size=len(body),
            text=text,
        )

    def assertRule(self, result: object, rule: str | None, code: int = 550) -> None:
        if rule is None:
            self.assertIsNone(result)
            return
        self.assertEqual(getattr(result, "rule", None), rule)
        reply = result.reply  # type: ignore[attr-defined]
        self.assertEqual(reply.code, code)
        self.assertIn(f"rule {rule} of route a@groups.example.com", reply.text)

    def test_rules(self) -> None:
        """One case refused and one accepted per rule."""
        good = (
            b"From: Boss <boss@example.com>\nTo: a@groups.example.com\nSubject: Hi\nMessage-ID: <1@x>\nContent-Type: text/plain\n\n"
            + b"x" * 100
            + b"\n"
        )
        cases = [
            ("max_size = 10", good, "max_size", 552),
            ("max_size = 1K", good, None, 0),
            ("min_body_size = 1K", good, "min_body_size", 550),
            ("accept_sender = *@example.com", good, "accept_sender", 550),
            ("accept_sender = example.org", good, None, 0),
            ("reject_sender = a@example.org", good, "reject_sender", 550),
            ("accept_from = other@example.com", good, "accept_from", 550),
            ("accept_from = boss@example.com", good, None, 0),
            ("reject_from = *@example.com", good, "reject_from", 550),
            ("accept_to = elsewhere.example", good, "accept_to", 550),
            ("require_header = X-Approved: yes", good, "require_header", 550),
            ("require_header = Subject: ^hi$", good, None, 0),
            ("forbid_header = Subject: hi", good, "forbid_header", 550),
            ("client_networks = 198.51.100.0/24", good, "client_networks", 550),
            ("client_networks = 192.0.2.0/24", good, None, 0),
            ("content_types = multipart/*", good, "content_types", 550),
            ("content_types = text/*", good, None, 0),
            ("require_message_id = yes", b"Subject: x\n\nbody\n", "require_message_id", 550),
            ("require_subject = yes", b"Subject:  \n\nbody\n", "require_subject", 550),
            ("require_body = yes", b"Subject: x\n\n", "require_body", 550),
            ("require_body = yes", good, None, 0),
        ]
        for rules, message, rule, code in cases:
            with self.subTest(rules=rules):
                self.assertRule(self.check(rules, message), rule, code)

    def test_words(self) -> None:
        """Word rules read the text given (subject and text parts), whole words, any case."""
        msg = b"Subject: x\n\nbody\n"
        self.assertRule(
            self.check("forbidden_words = viagra", msg, text="Buy VIAGRA now"), "forbidden_words"
        )
        self.assertRule(self.check("forbidden_words = viagra", msg, text="viagras"), None)
        self.assertRule(self.check("required_words = delegate", msg, text="about DeleGate"), None)
        self.assertRule(
            self.check("required_words = delegate", msg, text="other"), "required_words"
        )
        self.assertRule(self.check("max_exclamations = 2", msg, text="wow!!!"), "max_exclamations")
