# -*- test-case-name: tests.integration.test_postfix_pipe -*-
"""
Real Postfix piping the site's mail into gsmail's C{smtp2gs} command, set up
exactly as C{conf/postfix/pipe-main.cf.example} and
C{conf/postfix/master.cf.example} say (step 1 of C{docs/migration.md}); only
the user, the command's path, the configuration file and the URL are this
test's. Mail is submitted to Postfix's smtpd with smtplib, Postfix's pipe(8)
runs the command as an unprivileged user, and the tests read both ends: what
the GroupServer stand-in stored and the delivery status Postfix logged.

Postfix reads the command's first output line: C{4.x.x} defers the message
(it is retried within seconds here), C{5.x.x} bounces it. So: mail for a
group arrives once; mail for an unknown group bounces (the old behaviour;
over LMTP gsmail refuses it at RCPT, see C{test_postfix.py}); while
GroupServer fails or is down, Postfix defers and delivers once it is back;
and a post whose answer was lost is not posted again on Postfix's retry.

The command must be runnable by the pipe's user. When this interpreter is
not (a Python installed under C{/root}, say), the tests run the command with
the system's Python of the same version and a world-readable copy of
gsmail's dependencies, made once under C{/tmp}.
"""

from __future__ import annotations

import os
import pwd
from collections.abc import Mapping, Sequence
from typing import Final

from twisted.internet import reactor
from twisted.trial.unittest import TestCase

from gsmail import status
from tests.integration.postfix import Delivery, PrivatePostfix
from tests.integration.running import PIPE_USER, pipe_runtime, pipe_user
from tests.pipe import GROUPS, SENDER, TOKEN, write_config
from tests.util import ROOT, StandInServer

EXAMPLE: Final = "example@groups.example.com"
NOSUCH: Final = "nosuch@groups.example.com"


#: The example files the tests configure Postfix with.
CONF: Final = os.path.join(ROOT, "conf", "postfix")

#: What the tests replace in the master.cf entry: the example's value, and
#: the name of the test's own.
PLACEHOLDERS: Final = {
    "user=gsmail": "user",
    "/usr/local/bin/smtp2gs": "command",
    "/etc/groupserver/gsconfig.ini": "config",
    "https://groups.example.com": "url",
}

#: Retry timers of the tests' Postfix. With PrivatePostfix's 1 s backoff,
#: qmgr scans a deferred message while pipe(8) still has its queue file
#: locked ("skipped, still being delivered") and leaves it in the active queue
#: until qmgr restarts; 3 s lets the pipe process finish first. (Postfix's
#: default, 300 s, is far from that.)
RETRY: Final = {"minimal_backoff_time": "3s", "maximal_backoff_time": "4s"}


def message(message_id: str, subject: str = "Hello") -> bytes:
    """A small message with CRLF line ends."""
    return (
        f"From: Alice <{SENDER}>\r\nTo: {EXAMPLE}\r\nSubject: {subject}\r\n"
        f"Message-ID: <{message_id}>\r\n\r\nHello, group.\r\n"
    ).encode()


def read_main_cf(path: str) -> dict[str, str]:
    """The C{name = value} parameters of a main.cf file (continuation lines joined)."""
    params: dict[str, str] = {}
    name = None
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            if line[0].isspace() and name is not None:
                params[name] += " " + line.strip()
                continue
            name, _, value = line.partition("=")
            name = name.strip()
            params[name] = value.strip()
    return params


def read_master_cf_entry(path: str, service: str, values: Mapping[str, str]) -> str:
    """
    The entry for C{service} of a master.cf file, its continuation lines
    included, with each L{PLACEHOLDERS} value replaced by C{values[name]}.

    @raise AssertionError: the entry, or one of the placeholders, is missing.
    """
    with open(path, encoding="utf-8") as f:
        lines = [line.rstrip("\n") for line in f if not line.lstrip().startswith("#")]
    start = next(i for i, line in enumerate(lines) if line.split()[:1] == [service])
    entry = [lines[start]]
    entry += [line for line in _continuation(lines[start + 1 :])]
    text = "\n".join(entry)
    for placeholder, name in PLACEHOLDERS.items():
        if text.count(placeholder) != 1:
            raise AssertionError(f"{path}: {placeholder!r} not once in the {service} entry")
        replacement = f"user={values[name]}" if name == "user" else values[name]
        text = text.replace(placeholder, replacement)
    return text + "\n"


def _continuation(lines: Sequence[str]) -> list[str]:
    found = []
    for line in lines:
        if not line or not line[0].isspace():
            break
        found.append(line)
    return found


class PipePostfix(PrivatePostfix):
    """
    A private Postfix whose master.cf also has the C{smtp2gs} pipe service
    of C{conf/postfix/master.cf.example}.
    """

    pipe_service = ""

    def master_cf(self) -> str:
        return super().master_cf() + self.pipe_service


class AliasPostfix(PrivatePostfix):
    """
    A private Postfix with local(8), for the set-up gs.recipe.postfix wrote:
    every address of the site is a virtual alias of one local alias that
    pipes into the command.
    """

    def master_cf(self) -> str:
        return super().master_cf() + "local unix - n n - - local\n"


class PostfixPipeTests(TestCase):
    """Postfix pipes the site's mail into smtp2gs, as conf/postfix/ shows."""

    timeout = 90

    async def command(self, postfix: PrivatePostfix, user: pwd.struct_passwd) -> str:
        """
        Write the C{smtp2gs} command into C{postfix}'s directory, runnable by
        C{user}: what pip's console script does, for this checkout.
        """
        python, path = await pipe_runtime(user)
        command = postfix.path("smtp2gs")
        with open(command, "w", encoding="utf-8") as f:
            f.write(f'#!/bin/sh\nPYTHONPATH={":".join(path)} exec {python} -m gsmail.script "$@"\n')
        os.chmod(command, 0o755)
        return command

    async def start(self) -> PipePostfix:
        """
        Start the stand-in and a private Postfix whose smtp2gs service runs
        this checkout's command as L{PIPE_USER}, with a configuration and a
        post ledger of the test's. Cleanup, in this order: Postfix stops, the
        stand-in stops.
        """
        user = pipe_user()
        postfix = PipePostfix(self)
        self.server = StandInServer(self, GROUPS, TOKEN)
        self.standin = self.server.standin
        command = await self.command(postfix, user)
        state = postfix.path("state")
        os.makedirs(state)
        os.chown(state, user.pw_uid, user.pw_gid)  # the ledger is the pipe user's
        config = write_config(
            postfix.path("etc-gs"), gsmail={"ledger_path": os.path.join(state, "posted.log")}
        )
        postfix.pipe_service = read_master_cf_entry(
            os.path.join(CONF, "master.cf.example"),
            "smtp2gs",
            {"user": PIPE_USER, "command": command, "config": config, "url": self.server.url},
        )
        params = read_main_cf(os.path.join(CONF, "pipe-main.cf.example"))
        params.update(RETRY)
        await postfix.start(params.pop("virtual_transport"), params)
        return postfix

    async def start_aliased(self) -> AliasPostfix:
        """
        Like L{start}, but Postfix set up as gs.recipe.postfix did: a virtual
        alias domain whose addresses all go to the local alias
        C{groupserver-automagic}, which pipes into the command (run by
        local(8) as C{default_privs}, L{PIPE_USER}); no ledger.
        """
        user = pipe_user()
        postfix = AliasPostfix(self)
        self.server = StandInServer(self, GROUPS, TOKEN)
        self.standin = self.server.standin
        command = await self.command(postfix, user)
        config = write_config(postfix.path("etc-gs"))
        virtual, aliases = postfix.path("groupserver.virtual"), postfix.path("groupserver.aliases")
        with open(virtual, "w", encoding="utf-8") as f:
            f.write("groups.example.com  virtual\n@groups.example.com  groupserver-automagic\n")
        with open(aliases, "w", encoding="utf-8") as f:
            # In postmap's format (texthash: no postalias run); the value as
            # gs.recipe.postfix wrote it, plus --config.
            f.write(f'groupserver-automagic "|{command} --config {config} {self.server.url}"\n')
        extra = {
            "virtual_mailbox_domains": "",
            "virtual_alias_maps": f"texthash:{virtual}",
            "alias_maps": f"texthash:{aliases}",
            "mydestination": "$myhostname",
            "default_privs": PIPE_USER,
            **RETRY,
        }
        await postfix.start("error:not used", extra)
        return postfix

    async def send(self, postfix: PrivatePostfix, recipient: str, message_id: str) -> None:
        refused = await postfix.send(SENDER, [recipient], message(message_id))
        self.assertEqual(refused, {})

    def assertDeferred(self, delivery: Delivery, reply: status.Reply) -> None:
        """Postfix deferred the delivery with C{reply}'s code and text."""
        self.assertEqual(
            (delivery.status, delivery.dsn), ("deferred", reply.enhanced), delivery.line
        )
        self.assertIn(reply.text.split(" (")[0], delivery.text)

    async def test_post_arrives_once(self) -> None:
        """
        A message for a group's address is posted once, with the
        X-Original-To and Return-Path fields pipe(8) added; Postfix logs it
        as delivered by the smtp2gs service.
        """
        postfix = await self.start()
        await self.send(postfix, EXAMPLE, "once@example.org")
        sent = await postfix.attempt(EXAMPLE)
        self.assertEqual((sent.status, sent.agent, sent.relay), ("sent", "pipe", "smtp2gs"))
        [post] = self.standin.posts("example")
        self.assertTrue(
            post.startswith(f"Return-Path: <{SENDER}>\nX-Original-To: {EXAMPLE}\n".encode()), post
        )
        self.assertIn(b"Message-ID: <once@example.org>\n", post)
        self.assertTrue(post.endswith(b"\n\nHello, group.\n"), post)
        self.assertEqual(self.standin.requests["add"], 1)

    async def test_unknown_group_bounces(self) -> None:
        """
        Mail for an address no group has: the command says 5.1.1, so
        Postfix bounces it (the old command's behaviour); nothing is posted.
        """
        postfix = await self.start()
        await self.send(postfix, NOSUCH, "unknown@example.org")
        bounced = await postfix.attempt(NOSUCH)
        self.assertEqual((bounced.status, bounced.dsn), ("bounced", "5.1.1"), bounced.line)
        self.assertIn("No such group", bounced.text)
        self.assertEqual(self.standin.post_records(), [])

    async def test_groupserver_error_deferred(self) -> None:
        """
        GroupServer failing (500): the command says 4.5.0, so Postfix defers
        the message, and delivers it once GroupServer works again: one post.
        """
        postfix = await self.start()
        self.standin.faults.status = 500
        self.standin.faults.pages = frozenset({"add"})
        await self.send(postfix, EXAMPLE, "error@example.org")
        deferred = await postfix.attempt(EXAMPLE)
        self.assertDeferred(deferred, status.GROUPSERVER_ERROR)
        self.standin.faults.reset()
        await postfix.wait_for(EXAMPLE, "sent")
        self.assertEqual(len(self.standin.posts("example")), 1)

    async def test_groupserver_down_deferred(self) -> None:
        """
        GroupServer down (nothing listens): 4.4.4, Postfix defers; once it
        listens again the message is delivered, once.
        """
        postfix = await self.start()
        port = self.server.port.getHost().port
        await self.server.port.stopListening()
        await self.send(postfix, EXAMPLE, "down@example.org")
        deferred = await postfix.attempt(EXAMPLE)
        self.assertDeferred(deferred, status.GROUPSERVER_UNREACHABLE)
        self.server.port = reactor.listenTCP(port, self.server.factory, interface="127.0.0.1")
        await postfix.wait_for(EXAMPLE, "sent")
        self.assertEqual(len(self.standin.posts("example")), 1)

    async def test_answer_lost_posted_once(self) -> None:
        """
        The connection to GroupServer lost after the post was sent (the old
        command's double posts): 4.4.2, Postfix defers and retries, the retry
        adds it again, and GroupServer archives it once.
        """
        postfix = await self.start()
        self.standin.faults.drop = "after_store"
        self.standin.faults.pages = frozenset({"add"})
        self.standin.faults.remaining = 1
        await self.send(postfix, EXAMPLE, "lost@example.org")
        deferred = await postfix.attempt(EXAMPLE)
        self.assertDeferred(deferred, status.OUTCOME_UNKNOWN)
        await postfix.wait_for(EXAMPLE, "sent")
        self.assertEqual(len(self.standin.posts("example")), 1)
        self.assertEqual(self.standin.requests["add"], 2)

    async def test_old_alias_set_up(self) -> None:
        """
        Sites set up by gs.recipe.postfix keep their Postfix configuration
        and only point the alias at gsmail's command: local(8) pipes the
        message (with its From_ line and fields) and it is posted once.
        """
        postfix = await self.start_aliased()
        await self.send(postfix, EXAMPLE, "alias@example.org")
        # Logged for the alias, with orig_to=<example@groups.example.com>.
        sent = await postfix.attempt("groupserver-automagic@postfix.test.invalid")
        self.assertEqual((sent.status, sent.agent), ("sent", "local"), sent.line)
        self.assertIn(f"orig_to=<{EXAMPLE}>", sent.line)
        [post] = self.standin.posts("example")
        self.assertTrue(post.startswith(b"From alice@example.org "), post)
        self.assertIn(f"X-Original-To: {EXAMPLE}\n".encode(), post)
        self.assertIn(b"Message-ID: <alias@example.org>\n", post)
        self.assertEqual(self.standin.requests["add"], 1)
