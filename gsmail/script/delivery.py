# -*- test-case-name: tests.test_script -*-
"""
C{smtp2gs}'s delivery: a L{Job} (the message read and routed) handed to
GroupServer as the daemon hands it: a relay address to the relay page, an
XVERP address (screened first) to the bounce page, anything else to the
group-exists page and then the add-email page
(C{shared/groupserver-protocol.md}). It shares L{gsmail.posting} (the
page and the ledger key), L{gsmail.groupserver.GroupServerClient} and, when
the instance has a C{gsmail} section, the daemon's post ledger file, so a
message is posted once even when it arrives by the pipe and again over
LMTP. Every outcome is a reply (L{gsmail.status}).

Not the command line (L{gsmail.script.args}), the input
(L{gsmail.script.job}) or the exit status (L{gsmail.script}). Twisted
and the web client are imported only when L{deliver} runs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Final

from gsmail.script.args import normalised_url, shown_url

if TYPE_CHECKING:
    from twisted.internet.defer import Deferred
    from twisted.internet.interfaces import IReactorThreads

    from gsmail.groupserver import GroupServerClient, IClientReactor
    from gsmail.posting import Posting
    from gsmail.script.job import Job
    from gsmail.status import GroupServerError, Reply

    class IPipeReactor(IClientReactor, IReactorThreads):
        """
        What the command needs of a reactor: the GroupServer client's TCP,
        name resolution and time, and threads for the ledger's disk work.
        """


__all__ = ["LEDGER_WAIT", "deliver", "local_error"]

#: Seconds to wait while another process (the daemon, another smtp2gs) is
#: posting the same message before answering C{4.4.5}: the ledger's
#: C{wait_timeout}. With a post of its own afterwards (the other process
#: failed: at most twice C{response_timeout}, 480 s by default) the command
#: still ends before Postfix kills it (C{command_time_limit}, 1000 s), which
#: would leave a post without its ledger record.
LEDGER_WAIT: Final = 300.0


async def deliver(reactor: IPipeReactor, job: Job, *, ledger_wait: float = LEDGER_WAIT) -> Reply:
    """
    Hand C{job}'s message to GroupServer, through the post ledger when one
    is configured. Never fails: every outcome is a reply.

    @param reactor: connections, time and the thread pool (ledger writes).
    @param ledger_wait: seconds to wait while another process posts the
        same message (then C{4.4.5}).
    @return: C{2.0.0} posted, relayed, or already delivered (the ledger had
        it); C{2.1.5} bounce recorded; C{5.1.1} (exit 67) no such group;
        the L{GroupServerError}'s reply (C{4.4.4}, C{4.5.0}, C{4.4.7},
        C{4.4.2}), or C{4.4.5} (75) when another process posted the same
        message for longer than C{ledger_wait}; C{4.3.5} (78) the ledger
        cannot be opened; C{4.3.0} (75) anything else.
    """
    from gsmail import status
    from gsmail.groupserver import GroupServerClient
    from gsmail.status import GroupServerError

    config = job.config
    try:
        client = GroupServerClient(
            reactor,
            normalised_url(job.options.url),
            config.token,
            connect_timeout=config.connect_timeout,
            response_timeout=config.response_timeout,
            verify_tls=config.verify_tls,
            concurrency=1,
        )
    except ValueError:
        return status.NO_HOST_IN_URL.with_text(
            f"Bad GroupServer URL <{shown_url(job.options.url)}>"
        )
    try:
        return await _deliver(reactor, client, job, ledger_wait)
    except GroupServerError as e:
        return _failed(e, job)
    except Exception as e:
        from twisted.logger import Logger

        Logger(namespace="gsmail.script").failure("smtp2gs failed unexpectedly")
        return local_error(e)
    finally:
        await client.close()


def local_error(error: BaseException) -> Reply:
    from gsmail import status

    what = type(error).__name__
    if isinstance(error, OSError) and error.strerror:
        what = f"{what}: {error.strerror}"
    return status.LOCAL_ERROR.with_text(
        f"Local error in processing ({what}); the message was not posted"
    )


async def _deliver(
    reactor: IPipeReactor, client: GroupServerClient, job: Job, ledger_wait: float
) -> Reply:
    from gsmail import status
    from gsmail.addresses import Address, Route, RouteKind
    from gsmail.posting import plan_posting

    source = job.source()
    route = job.route
    if route is None or route.kind is RouteKind.GROUP:
        if route is None:
            assert job.options.list_id is not None
            # --list names the group: no address is looked up (nor used).
            forced = Address(job.options.list_id, "")
            route = Route(RouteKind.GROUP, forced, group_id=job.options.list_id)
        else:
            recipient = route.recipient
            if not recipient.local.isascii():
                # GroupServer's group-exists field is ASCII only (as the daemon).
                return status.NO_SUCH_GROUP.with_text(f"No such group <{recipient}>")
            info = await client.lookup_group(str(recipient))
            if not info.group_id:
                return status.NO_SUCH_GROUP.with_text(f"No such group <{recipient}>")
            route = Route(RouteKind.GROUP, recipient, group_id=info.group_id)
    from gsmail.bounces import BounceScreen

    posting = plan_posting(
        client, route, source, job.message.digest, job.options.time_source, BounceScreen(job.verp)
    )
    if posting.screen is not None:
        dropped = await posting.screen()
        if dropped is not None:
            return dropped
    if not job.config.ledger_path:
        await posting.action()
        return posting.success
    return await _through_ledger(reactor, job, posting, ledger_wait)


async def _through_ledger(
    reactor: IPipeReactor, job: Job, posting: Posting, ledger_wait: float
) -> Reply:
    from twisted.internet.threads import deferToThreadPool

    from gsmail import status
    from gsmail.ledger import Outcome, PostLedger

    config = job.config

    def in_thread(f: Callable[[], None]) -> Deferred[None]:
        return deferToThreadPool(reactor, reactor.getThreadPool(), f)

    # One message: no need to parse the whole file (preload), a look-up
    # searches its bytes.
    ledger = PostLedger(
        config.ledger_path,
        ttl=config.ledger_ttl,
        clock=reactor,
        sync=in_thread,
        preload=False,
        wait_timeout=ledger_wait,
    )
    try:
        await in_thread(ledger.open)
    except OSError as e:
        # Usually permissions: run the command as the daemon's user.
        return status.CONFIG_ERROR.with_text(
            f"Cannot open the post ledger {ledger.path}: {e.strerror or e}"
        )
    try:
        outcome = await ledger.run(posting.key, posting.action)
    except OSError as e:
        # Either the ledger could not be read, or the post was made and its
        # record did not reach the disk (the daemon answers 451 too).
        return status.LOCAL_ERROR.with_text(
            f"Could not use the post ledger {config.ledger_path}: {e.strerror or e}"
        )
    finally:
        try:
            await ledger.close()
        except OSError:
            pass  # logged by the ledger; the outcome above stands
    if outcome is Outcome.DONE:
        return posting.success
    return status.ALREADY_DELIVERED


def _failed(error: GroupServerError, job: Job) -> Reply:
    """The reply for a failed call to GroupServer, with the client's detail."""
    from gsmail import status

    reply = error.reply
    text = reply.text
    if reply == status.GROUPSERVER_UNREACHABLE:
        text = f"{text} <{shown_url(job.options.url)}>"
    if error.detail:
        text = f"{text} ({error.detail})"
    return reply.with_text(" ".join(text.split()))
