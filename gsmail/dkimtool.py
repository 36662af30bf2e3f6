# -*- test-case-name: tests.test_dkimtool -*-
"""
C{gsmail-dkim}: make DKIM keys and check that DNS publishes them::

    gsmail-dkim genkey DOMAIN SELECTOR [--ed25519] [--bits N] [--dir D] [--user USER]
    gsmail-dkim check [--config PATH] [--instance NAME] [--dns HOST[:PORT]]

C{genkey} writes a new private key to C{D/DOMAIN.SELECTOR.key} (mode 0600;
given to C{USER} when run as root, e.g. C{--user gsmail}, the user gsmail
runs as; never over an existing file) and prints the DNS TXT record to
publish and the C{dkim_keys} entry to add (L{gsmail.signing}).

C{check} reads C{dkim_keys} from the configuration and, for each key, looks
up C{SELECTOR._domainkey.DOMAIN} (the C{dns_servers} of the configuration,
else C{/etc/resolv.conf}, or C{--dns}) and says whether the published
record is that key's; for one that is not, it prints the record to publish.

Exit status (sysexits(3)): 0 every key is usable and published; 1 a key is
missing from DNS, published differently or unusable; 64 bad command line;
73 the key file exists or cannot be made; 75 DNS did not answer (try again);
77 the owner cannot be set (not root); 78 configuration error.
"""

from __future__ import annotations

import argparse
import os
import pwd
import sys
from collections.abc import Callable, Sequence
from typing import Final, NoReturn, TextIO

from gsmail import __version__
from gsmail.status import EX_CONFIG, EX_OK, EX_TEMPFAIL, EX_USAGE

__all__ = ["check", "check_key", "dns_lookup", "genkey", "main", "run"]

EX_PROBLEM: Final = 1
EX_CANTCREAT: Final = 73
EX_NOPERM: Final = 77

_PROG: Final = "gsmail-dkim"

#: Looks up the TXT records at a name: their texts (strings joined); C{[]}
#: when there are none; raises L{LookupFailed} when DNS does not answer.
TXTLookup = Callable[[str], list[bytes]]


class LookupFailed(Exception):
    """DNS did not answer (timeout, SERVFAIL)."""


class _Usage(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise _Usage(message)


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=_PROG, description="Make DKIM keys and check their DNS records.")
    parser.add_argument("--version", action="version", version=f"{_PROG} (gsmail) {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    gen = commands.add_parser("genkey", help="write a new key and print its DNS record")
    gen.add_argument("domain", help="the signing domain (d=)")
    gen.add_argument("selector", help="the selector (s=), e.g. gs2025")
    gen.add_argument("--ed25519", action="store_true", help="an ed25519 key (RFC 8463)")
    gen.add_argument("--bits", type=int, default=2048, help="RSA key size (default 2048)")
    gen.add_argument("--dir", default=".", help="where to write it (default: here)")
    gen.add_argument("--user", help="give the file to this user (as root)")
    chk = commands.add_parser("check", help="check the published records of dkim_keys")
    chk.add_argument("--config", default="/etc/groupserver/gsconfig.ini")
    chk.add_argument("--instance", default="default")
    chk.add_argument("--dns", action="append", default=[], help="DNS server host[:port]")
    return parser


def genkey(
    domain: str,
    selector: str,
    *,
    ed25519: bool = False,
    bits: int = 2048,
    directory: str = ".",
    user: str | None = None,
    out: TextIO = sys.stdout,
    err: TextIO = sys.stderr,
) -> int:
    """
    Write a new key, print its DNS record and its C{dkim_keys} entry.

    @return: the exit status.
    """
    from gsmail.signing import dns_record, generate_key, load_key, parse_key_specs

    try:
        [spec] = parse_key_specs([f"{domain}:{selector}:{domain}.{selector}.key"], directory)
    except ValueError as e:
        err.write(f"{_PROG}: {e}\n")
        return EX_USAGE
    if not ed25519 and bits < 2048 and bits != 1024:
        err.write(f"{_PROG}: RSA keys have at least 2048 bits\n")
        return EX_USAGE
    owner: pwd.struct_passwd | None = None
    if user is not None:
        try:
            owner = pwd.getpwnam(user)
        except KeyError:
            err.write(f"{_PROG}: no such user: {user}\n")
            return EX_USAGE
    path = os.path.abspath(spec.path)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except OSError as e:
        err.write(f"{_PROG}: cannot make {path}: {e.strerror}\n")
        return EX_CANTCREAT
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(generate_key(ed25519_key=ed25519, bits=bits))
            os.fchmod(f.fileno(), 0o600)  # whatever the umask
            if owner is not None:
                os.fchown(f.fileno(), owner.pw_uid, owner.pw_gid)
    except PermissionError:
        os.unlink(path)
        err.write(f"{_PROG}: cannot give {path} to {user}: run as root\n")
        return EX_NOPERM
    except BaseException:
        os.unlink(path)
        raise
    key = load_key(path)
    who = f", owner {user}" if user is not None else ""
    out.write(
        f"Wrote {path} ({key.algorithm}, {key.bits} bits, mode 0600{who}).\n\n"
        f"Publish this DNS record:\n\n{dns_record(spec.domain, spec.selector, key)}\n\n"
        f"and add the key to dkim_keys in the [gsmail-NAME] section:\n\n"
        f"dkim_keys = {spec.domain}:{spec.selector}:{path}\n"
    )
    return EX_OK


#: The verdicts of L{check_key}, as C{gsmail-dkim check} prints them.
OK: Final = "ok"
MISSING: Final = "MISSING"
MISMATCH: Final = "MISMATCH"
UNUSABLE: Final = "UNUSABLE"
NO_ANSWER: Final = "NO ANSWER"


def check_key(entry: str, lookup: TXTLookup | None) -> tuple[str, str]:
    """
    Check one C{dkim_keys} entry (file name absolute): is its key usable,
    and (with C{lookup}) is it what DNS publishes at its selector?

    @param lookup: the TXT lookup (blocking); C{None}: the key file only.
    @return: the verdict (L{OK}, L{MISSING}, L{MISMATCH}, L{UNUSABLE},
        L{NO_ANSWER}) and what to say, starting with C{DOMAIN:SELECTOR: }
        (for L{MISSING} and L{MISMATCH}, a second line with the record to
        publish).
    """
    from gsmail.signing import (
        DKIMKeyError,
        dns_record,
        load_key,
        parse_key_specs,
        public_key_matches,
        record_name,
    )

    [spec] = parse_key_specs([entry])
    label = f"{spec.domain}:{spec.selector}"
    try:
        key = load_key(spec.path)
    except DKIMKeyError as e:
        return UNUSABLE, f"{label}: {e}"
    name = record_name(spec.domain, spec.selector)
    if lookup is None:
        return OK, f"{label}: {key.algorithm}, {key.bits} bits (DNS not asked)"
    try:
        records = lookup(name)
    except LookupFailed as e:
        return NO_ANSWER, f"{label}: DNS did not answer for {name} ({e})"
    publish = dns_record(spec.domain, spec.selector, key)
    if not records:
        return MISSING, f"{label}: no DKIM record at {name}; publish:\n  {publish}"
    problems = [public_key_matches(r, key) for r in records]
    if None in problems and len(records) == 1:
        return OK, f"{label}: {key.algorithm}, {key.bits} bits, published at {name}"
    why = "several records" if len(records) > 1 else problems[0]
    return MISMATCH, f"{label}: {why}; publish instead:\n  {publish}"


def check(entries: Sequence[str], lookup: TXTLookup, out: TextIO = sys.stdout) -> int:
    """
    Check each configured key (C{dkim_keys} entries, file names absolute)
    against what DNS publishes; one line each (L{check_key}).

    @return: the exit status.
    """
    status = EX_OK
    for entry in entries:
        verdict, text = check_key(entry, lookup)
        out.write(f"{verdict:<9} {text}\n")
        if verdict == NO_ANSWER:
            if status == EX_OK:
                status = EX_TEMPFAIL
        elif verdict != OK:
            status = EX_PROBLEM
    return status


def dns_lookup(servers: Sequence[str], timeout: float = 10.0) -> TXTLookup:
    """
    A TXT lookup with dnspython through C{servers} (else C{/etc/resolv.conf}),
    each lookup bounded by C{timeout} seconds.

    @raise ValueError: a server is not C{host[:port]}.
    """
    import dns.exception
    import dns.resolver

    from gsmail.inbound.authresults.checks import make_resolver

    resolver = make_resolver(servers)

    def lookup(name: str) -> list[bytes]:
        try:
            answer = resolver.resolve(name, "TXT", lifetime=timeout, raise_on_no_answer=False)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return []
        except dns.exception.DNSException as e:
            raise LookupFailed(e.__class__.__name__) from None
        return [b"".join(r.strings) for r in answer.rrset or []]

    return lookup


def run(argv: Sequence[str], out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    """Run the command line C{argv} (without the program name); return the exit status."""
    try:
        args = _parser().parse_args(list(argv))
    except _Usage as e:
        err.write(f"{_PROG}: {e}\n")
        return EX_USAGE
    except SystemExit as e:  # --help, --version
        return EX_OK if e.code in (0, None) else EX_USAGE
    if args.command == "genkey":
        return genkey(
            args.domain,
            args.selector,
            ed25519=args.ed25519,
            bits=args.bits,
            directory=args.dir,
            user=args.user,
            out=out,
            err=err,
        )
    from gsmail.config import ConfigError, load_config

    try:
        config = load_config(args.config, args.instance)
    except ConfigError as e:
        err.write(f"{_PROG}: configuration error: {e}\n")
        return EX_CONFIG
    if not config.dkim_keys:
        err.write(f"{_PROG}: no dkim_keys in {args.config}: nothing to check\n")
        return EX_OK
    try:
        lookup = dns_lookup(args.dns or config.dns_servers)
    except ValueError as e:
        err.write(f"{_PROG}: bad DNS server: {e}\n")
        return EX_USAGE
    return check(config.dkim_keys, lookup, out)


def main(argv: Sequence[str] | None = None) -> NoReturn:
    """The console script."""
    sys.exit(run(sys.argv[1:] if argv is None else argv))
