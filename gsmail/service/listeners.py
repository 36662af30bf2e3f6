# -*- test-case-name: tests.test_startup,tests.integration.test_startup_failures -*-
"""
The listeners of L{gsmail.service.GsmailService}: an endpoint string made
into a listening service (gsmail's own TLS context for implicit TLS,
C{backlog=} added), the owner, group and mode of a UNIX socket, where a
listener listens as an operator writes it, and which listeners are not up
(for C{/readyz}).

Not the protocols they serve (L{gsmail.inbound}, L{gsmail.outbound}) nor
the order things start in (L{gsmail.service}).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from twisted.application import strports
from twisted.application.internet import StreamServerEndpointService
from twisted.internet.address import UNIXAddress
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from gsmail.config import ConfigError, GsmailConfig
from gsmail.inbound.parts import _why, with_backlog
from gsmail.privileges import RunUser, secure_socket
from gsmail.startup import listen_failure
from gsmail.tlsconfig import ServerTLS, implicit_tls_endpoint
from gsmail.twistedcompat import raise_listen_errors, waiting_for_port

if TYPE_CHECKING:
    from gsmail.service import GsmailService

__all__ = [
    "has_mode",
    "listener_problems",
    "listening_service",
    "result_now",
    "secure_listener",
    "where",
]


def listening_service(
    reactor: Any,
    config: GsmailConfig,
    name: str,
    configured: str,
    factory: Any,
    own_tls: list[ServerTLS],
) -> Any:
    """
    The service that listens for listener C{name} (C{"smtp"}, C{"lmtp"},
    C{"submission"}) on C{configured}, its endpoint string.

    @param own_tls: gets the TLS context of an implicit-TLS listener (read
        again on reload).
    @raise ConfigError: its TLS files cannot be loaded.
    @raise StartupError: the endpoint string cannot be parsed.
    """
    description = with_backlog(configured, config.listen_backlog)
    try:
        # ssl: listeners get gsmail's TLS context, not Twisted's (gsmail.tlsconfig).
        endpoint = implicit_tls_endpoint(
            reactor,
            description,
            "intermediate" if name == "submission" else config.tls_ciphers,
            own_tls,
        )
    except Exception as e:
        raise ConfigError(
            f"{config.path}: [gsmail-*] {name}_endpoint: cannot load: {_why(e)}"
        ) from None
    if endpoint is None:
        try:
            svc = strports.service(description, factory, reactor=reactor)
        except Exception as e:
            raise listen_failure(f"{name}_endpoint", configured, e) from None
    else:
        svc = StreamServerEndpointService(endpoint, factory)
        raise_listen_errors(svc)
    svc.setName(name)
    return svc


def secure_listener(name: str, svc: Any, config: GsmailConfig, run_as: RunUser | None) -> None:
    """The owner, group and mode of a UNIX listener's socket."""
    waiting = waiting_for_port(svc)
    if waiting is None:
        return
    address = waiting.result.getHost()
    if not isinstance(address, UNIXAddress) or not address.name:
        return  # TCP, or a socket systemd made (SocketMode=, SocketGroup=)
    path = os.fsdecode(address.name)
    description = getattr(config, f"{name}_endpoint")
    mode = None if has_mode(description) else config.unix_socket_mode
    secure_socket(f"{name}_endpoint", path, mode, config.unix_socket_group, run_as)


def listener_problems(listeners: dict[str, Any], workers: Any, config: GsmailConfig) -> list[str]:
    """For C{/readyz}: a line per listener that is not listening (or no worker ready)."""
    problems = []
    for name, svc in listeners.items():
        if workers is not None and name in ("smtp", "lmtp"):
            continue  # the workers accept on these
        waiting = waiting_for_port(svc)
        if (
            not svc.running
            or waiting is None
            or not waiting.called
            or isinstance(waiting.result, Failure)
        ):
            configured = getattr(config, f"{name}_endpoint")
            problems.append(f"{name}_endpoint: not listening on {configured}")
    if workers is not None:
        slots = workers.slots
        if not any(slot.ready for slot in slots):
            problems.append(f"inbound_workers: none of the {len(slots)} workers is ready")
    return problems


def has_mode(description: str) -> bool:
    """Whether a C{unix:} endpoint string gives the socket's C{mode=} itself."""
    return any(part.strip().startswith("mode=") for part in description.split(":")[1:])


def where(service: GsmailService, name: str, scheme: str = "") -> str:
    """
    Where listener C{name} listens, as an operator writes it (C{127.0.0.1:25},
    a path); C{scheme} goes before a TCP address.
    """
    try:
        address = service.port(name).getHost()
    except Exception:
        return str(getattr(service.config, f"{name}_endpoint"))
    if isinstance(address, UNIXAddress):
        return os.fsdecode(address.name or b"?")
    host = f"[{address.host}]" if ":" in address.host else address.host
    return f"{scheme}{host}:{address.port}" if scheme else f"{address.host}:{address.port}"


def result_now(d: Deferred[Any]) -> Any:
    """The result of a Deferred that has already fired (listen() on TCP/UNIX)."""
    results: list[Any] = []
    d.addBoth(results.append)
    if not results:
        raise RuntimeError("listening did not complete synchronously")
    if hasattr(results[0], "raiseException"):
        results[0].raiseException()
    return results[0]
