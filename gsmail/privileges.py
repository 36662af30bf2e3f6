# -*- test-case-name: tests.test_privileges -*-
"""
Running as root that drops to a user, as MTAs do: twistd binds the
listeners as root (C{privilegedStartService}), then switches to C{--uid} /
C{--gid}. Before it does, gsmail makes the state directories it needs and
hands the ones it made to that user (L{prepare_state}), refuses to start on
state the user cannot write (an earlier run as root) with one line naming
what to C{chown}, and gives its UNIX listener sockets the owner, group and
mode of C{unix_socket_group} / C{unix_socket_mode} (L{secure_socket}), so
that Postfix's C{lmtp} client (in that group) can connect after the drop.

Blocking file-system calls: run before the reactor runs.
"""

from __future__ import annotations

import grp
import os
import pwd
import stat
import tempfile
from collections.abc import Iterable

import attrs

from gsmail.config import GsmailConfig, mta_sts_cache_path, verp_key_path
from gsmail.startup import EX_CANTCREAT, EX_NOPERM, StartupError

__all__ = [
    "RunUser",
    "StatePath",
    "check_state",
    "prepare_state",
    "run_user",
    "secure_socket",
    "state_paths",
]

_READ = 4
_WRITE = 2
_SEARCH = 1


@attrs.frozen
class RunUser:
    """
    The user and groups gsmail runs as once privileges are dropped.

    @ivar uid: the user id.
    @ivar gid: the primary group id.
    @ivar name: the user's name (or its number when it has no entry).
    @ivar groups: every group it is in (the primary one, and what
        C{initgroups(3)} gives it, as twistd's C{switchUID} does).
    """

    uid: int
    gid: int
    name: str
    groups: frozenset[int]

    @classmethod
    def of(cls, uid: int, gid: int | None = None) -> RunUser:
        """
        The user C{uid} with primary group C{gid} (default: its passwd entry's).
        """
        try:
            entry = pwd.getpwuid(uid)
        except KeyError:
            primary = os.getgid() if gid is None else gid
            return cls(uid, primary, str(uid), frozenset({primary}))
        primary = entry.pw_gid if gid is None else gid
        groups = frozenset({primary, *os.getgrouplist(entry.pw_name, primary)})
        return cls(uid, primary, entry.pw_name, groups)

    @classmethod
    def current(cls) -> RunUser:
        """The user this process runs as now."""
        return cls.of(os.geteuid(), os.getegid())

    def group_name(self) -> str:
        """The name of the primary group (or its number)."""
        return _group_name(self.gid)

    def may(self, info: os.stat_result, bits: int) -> bool:
        """
        Whether this user may read (4), write (2) and/or search (1) a file
        of C{info} by its mode bits (ACLs are not read); root may do all.
        """
        if self.uid == 0:
            return True
        if info.st_uid == self.uid:
            shift = 6
        elif info.st_gid in self.groups:
            shift = 3
        else:
            shift = 0
        return (info.st_mode >> shift) & bits == bits


def run_user(uid: int | None, gid: int | None) -> RunUser | None:
    """
    The user twistd switches to after C{privilegedStartService} (its
    C{--uid} and C{--gid}), or C{None} when it switches to no one: not
    started as root, or no C{--uid}/C{--gid}, or root again.
    """
    if os.geteuid() != 0 or (uid is None and gid is None):
        return None
    user = RunUser.of(0 if uid is None else uid, gid)
    if user.uid == 0 and user.gid == 0:
        return None
    return user


@attrs.frozen
class StatePath:
    """
    A directory gsmail writes in, with the files in it that are gsmail's.

    @ivar option: the option that names it, for messages.
    @ivar directory: the directory, made at start when missing.
    @ivar files: the files (or subdirectories) in it that gsmail reads
        and writes, when they exist; C{None}: every entry in it.
    @ivar mode: the mode a new directory gets (before the umask).
    @ivar subdirectories: directories made inside it (a Maildir's).
    @ivar shared: the directory is not gsmail's alone (C{/tmp}): it is
        never handed to the run user, only checked for writing.
    """

    option: str
    directory: str
    files: tuple[str, ...] | None = ()
    mode: int = 0o755
    subdirectories: tuple[str, ...] = ()
    shared: bool = False


def state_paths(config: GsmailConfig) -> list[StatePath]:
    """
    Every directory a configuration makes gsmail write in: the post
    ledger's (with the VERP key file unless it is elsewhere), the spool,
    the postmaster Maildir, the route table's state and the copies of
    failed and refused messages (C{errors_dir}, C{rejected_dir}), the
    outbound queue (with C{submission_endpoint}; and the MTA-STS policy
    cache when it delivers by MX with C{mta_sts}) and the embedded
    stand-in's (with C{url = embedded}).
    """
    ledger = os.path.abspath(config.ledger_path)
    ledger_files = [ledger + suffix for suffix in ("", ".lock", ".claims", ".tmp")]
    key = verp_key_path(config)
    paths = [StatePath("ledger_path", os.path.dirname(ledger), tuple(ledger_files))]
    if os.path.dirname(key) == os.path.dirname(ledger):
        paths[0] = attrs.evolve(paths[0], files=(*ledger_files, key))
    else:
        paths.append(StatePath("verp_key_file", os.path.dirname(key), (key,)))
    if config.spool_dir:
        # The system's temporary directory (the default) is everyone's.
        shared = os.path.realpath(config.spool_dir) == os.path.realpath(tempfile.gettempdir())
        paths.append(StatePath("spool_dir", config.spool_dir, (), shared=shared))
    paths.append(
        StatePath(
            "postmaster_maildir",
            config.postmaster_maildir,
            None,
            subdirectories=("tmp", "new", "cur"),
        )
    )
    # The route table's sequence numbers, and the copies gsmail keeps.
    paths.append(StatePath("route_state_dir", config.route_state_dir, None))
    for option in ("errors_dir", "rejected_dir"):
        if getattr(config, option):
            paths.append(StatePath(option, getattr(config, option), None, mode=0o700))
    if config.submission_endpoint:
        paths.append(StatePath("queue_dir", config.queue_dir, None, mode=0o700))
    if config.submission_endpoint and config.mta_sts and not config.relayhost:
        # The MTA-STS policy cache (and its TLS-RPT counts), for MX delivery.
        subdirectories = ("tlsrpt",) if config.tls_rpt else ()
        paths.append(
            StatePath(
                "mta_sts_cache_dir",
                mta_sts_cache_path(config),
                None,
                mode=0o750,
                subdirectories=subdirectories,
            )
        )
    if config.url == "embedded":
        paths.append(StatePath("standin_dir", config.standin_dir, None))
    return paths


def prepare_state(paths: Iterable[StatePath], user: RunUser | None) -> None:
    """
    Make the missing state directories and check that gsmail can write the
    rest, before it accepts mail.

    When C{user} is given (twistd will drop root to it), the directories
    are made as root and each one made is given to C{user}, its missing
    parents included (as systemd's C{StateDirectory=} does); directories
    that exist are never changed. Without C{user}, they are made as the
    process's user.

    @param user: the user twistd switches to, or C{None}.
    @raise StartupError: one line and its exit status: a directory cannot
        be made (L{EX_CANTCREAT}, 73), or gsmail's user cannot write a
        directory or one of gsmail's files, such as state an earlier run as
        root left (L{EX_NOPERM}, 77): the line names what to C{chown}.
    """
    runner = user or RunUser.current()
    blocked: list[str] = []
    first = ""
    for path in paths:
        directory = os.path.abspath(path.directory)
        made = _make_directories(path, directory, user)
        for sub in path.subdirectories:
            _make_directories(path, os.path.join(directory, sub), user)
        if made or runner.uid == 0:
            continue
        problem = _problem(path, directory, runner)
        if problem:
            first = first or problem
            if not path.shared and directory not in blocked:
                blocked.append(directory)
            elif path.shared:
                raise StartupError(f"{problem}; let {runner.name} write there", EX_NOPERM)
    if blocked:
        owner = f"{runner.name}:{runner.group_name()}"
        raise StartupError(
            f"{first}, so gsmail cannot run as {runner.name} (state left by a run as root?): "
            f"chown -R {owner} {' '.join(blocked)}",
            EX_NOPERM,
        )


def check_state(paths: Iterable[StatePath], user: RunUser | None) -> list[str]:
    """
    What would stop L{prepare_state}, without changing anything (for
    C{gsmail-check}): one line per problem, each saying what to do.

    @param user: the user twistd would drop root to, or C{None}: the
        process's user runs gsmail.
    """
    runner = user or RunUser.current()
    maker = RunUser.current() if user is not None else runner
    problems = []
    for path in paths:
        directory = os.path.abspath(path.directory)
        if not os.path.lexists(directory):
            parent = directory
            while not os.path.lexists(parent) and os.path.dirname(parent) != parent:
                parent = os.path.dirname(parent)
            try:
                info = os.stat(parent)
            except OSError as e:
                problems.append(f"{path.option}: cannot use {parent}: {e.strerror or e}")
                continue
            if not stat.S_ISDIR(info.st_mode) or not maker.may(info, _WRITE | _SEARCH):
                problems.append(
                    f"{path.option}: {maker.name} cannot make {directory} in {parent} "
                    f"({_describe(info)}): install -d -o {runner.name} {directory}"
                )
            continue
        try:
            problem = "" if runner.uid == 0 else _problem(path, directory, runner)
        except StartupError as e:  # a parent it cannot pass through
            problems.append(str(e))
            continue
        if problem:
            fix = (
                f"let {runner.name} write there"
                if path.shared
                else f"chown -R {runner.name}:{runner.group_name()} {directory}"
            )
            problems.append(f"{problem}: {fix}")
    return problems


def _make_directories(path: StatePath, directory: str, user: RunUser | None) -> list[str]:
    """Make C{directory} and its missing parents; hand them to C{user}. @return: those made."""
    missing = []
    current = directory
    while not os.path.lexists(current):
        missing.append(current)
        parent = os.path.dirname(current)
        if parent == current:
            break
        current = parent
    made = []
    for name in reversed(missing):
        try:
            os.mkdir(name, path.mode if name == directory else 0o755)
            if user is not None:
                os.chown(name, user.uid, user.gid)
        except OSError as e:
            as_user = (user or RunUser.current()).name
            raise StartupError(
                f"{path.option}: cannot make {name} as {as_user}: {e.strerror or e}"
                f" (make it: install -d -o {as_user} {name})",
                EX_CANTCREAT,
            ) from None
        made.append(name)
    return made


def _problem(path: StatePath, directory: str, user: RunUser) -> str:
    """
    What keeps C{user} from using C{path} that a C{chown} of it mends, or C{""}.

    @raise StartupError: C{user} cannot reach it (a parent directory).
    """
    # Every parent must let the user through.
    parent = os.path.dirname(directory)
    while True:
        try:
            info = os.stat(parent)
        except OSError:
            break
        if not user.may(info, _SEARCH):
            # Not gsmail's directory: no chown, the way through is missing.
            raise StartupError(
                f"{path.option}: {user.name} cannot enter {parent} ({_describe(info)}), which "
                f"holds {directory}: let it through (chmod o+x {parent}) or move the state",
                EX_NOPERM,
            )
        if os.path.dirname(parent) == parent:
            break
        parent = os.path.dirname(parent)
    try:
        info = os.stat(directory)
    except OSError as e:
        return f"{path.option}: cannot use {directory}: {e.strerror or e}"
    if not stat.S_ISDIR(info.st_mode):
        return f"{path.option}: {directory} is not a directory"
    if not user.may(info, _WRITE | _SEARCH):
        return f"{path.option}: {user.name} cannot write {directory} ({_describe(info)})"
    if path.files is None:
        try:
            names = [os.path.join(directory, name) for name in sorted(os.listdir(directory))]
        except OSError as e:
            return f"{path.option}: cannot list {directory}: {e.strerror or e}"
    else:
        names = list(path.files)
    for name in names:
        try:
            info = os.lstat(name)
        except FileNotFoundError:
            continue
        except OSError as e:
            return f"{path.option}: cannot use {name}: {e.strerror or e}"
        bits = _READ | _WRITE | (_SEARCH if stat.S_ISDIR(info.st_mode) else 0)
        if not stat.S_ISLNK(info.st_mode) and not user.may(info, bits):
            return f"{path.option}: {user.name} cannot write {name} ({_describe(info)})"
    return ""


def _describe(info: os.stat_result) -> str:
    """C{root:root 0700}: a file's owner, group and mode, as ls shows them."""
    return f"{_user_name(info.st_uid)}:{_group_name(info.st_gid)} {stat.S_IMODE(info.st_mode):04o}"


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def socket_group(name: str) -> int:
    """
    The group id of C{unix_socket_group} (a name or a number).

    @raise StartupError: no such group (L{EX_CONFIG}, as in the file).
    """
    try:
        return int(name) if name.isdigit() else grp.getgrnam(name).gr_gid
    except KeyError:
        raise StartupError(f"unix_socket_group: no such group on this host: {name!r}") from None


def secure_socket(
    option: str, path: str, mode: int | None, group: str, user: RunUser | None
) -> None:
    """
    Give the UNIX listener socket C{path} its owner, group and mode: owned
    by C{user} (when twistd drops root to it), in group C{group} (default:
    C{user}'s group, or unchanged), with C{mode} (C{None}: unchanged, for an
    endpoint string that gives C{mode=} itself).

    @param option: the option that names the listener, for messages.
    @raise StartupError: C{chown} or C{chmod} failed (L{EX_NOPERM}): a
        process that is not root may only give a socket to a group it is in.
    """
    gid = socket_group(group) if group else (user.gid if user is not None else -1)
    uid = user.uid if user is not None else -1
    try:
        if uid != -1 or gid != -1:
            os.chown(path, uid, gid)
        if mode is not None:
            os.chmod(path, mode)
    except OSError as e:
        who = (user or RunUser.current()).name
        raise StartupError(
            f"{option}: cannot give {path} group {group or gid} and mode {mode or 0:04o}"
            f" as {who}: {e.strerror or e} (start as root, or set unix_socket_group to a group"
            f" {who} is in)",
            EX_NOPERM,
        ) from None
