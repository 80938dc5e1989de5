"""The broker's side of systemd: readiness notification, the watchdog and socket activation.

Theory of operation
-------------------
systemd speaks to a service through two small, documented interfaces, both implemented here in
plain Python so that the broker needs no ``libsystemd`` (see ``sd_notify(3)`` and
``sd_listen_fds(3)``):

*Notification.* When a unit has ``Type=notify``, systemd puts the path of a Unix datagram socket
in ``$NOTIFY_SOCKET`` (a name starting with ``@`` is in the abstract namespace). The service sends
newline-separated ``KEY=VALUE`` assignments to it: ``READY=1`` once it serves (``systemctl start``
waits for it), ``RELOADING=1`` when a reload begins (followed by ``READY=1`` when it ends),
``STOPPING=1`` when it begins to shut down, ``WATCHDOG=1`` as a heartbeat, ``STATUS=...`` as a
line shown by ``systemctl status``. With ``NotifyAccess=main`` systemd accepts these only from
the main process, so in the broker only the supervisor calls :func:`notify`; the workers prove
that they are alive to the supervisor, and the supervisor's :func:`watchdog_loop` turns that into
heartbeats. Every function here returns ``False`` (and does nothing) when the process is not run
by systemd, so callers never need to check first.

*Watchdog.* With ``WatchdogSec=``, systemd sets ``$WATCHDOG_USEC`` (and ``$WATCHDOG_PID``, the
process it is meant for) and kills the service with ``SIGABRT`` if no ``WATCHDOG=1`` arrives within
that interval. :func:`watchdog_loop` sends one every half interval, but only while the caller's
``is_alive()`` says the service is healthy: a hung service then stops the heartbeats and systemd
restarts it (``Restart=on-failure``).

*Socket activation.* When a ``.socket`` unit starts the service, systemd passes the listening
sockets as file descriptors 3, 4, ... and says so in ``$LISTEN_FDS`` (how many), ``$LISTEN_PID``
(which process they are for: a child that inherits the environment must not take them too) and
``$LISTEN_FDNAMES`` (colon-separated names from ``FileDescriptorName=``). :func:`listen_fds` wraps
them in :class:`socket.socket` objects, marks them close-on-exec and removes the variables from
the environment, so that nothing the broker starts later believes that the sockets are its own.
A supervisor hands such a socket to its workers explicitly (``pass_fds=``).
"""

from __future__ import annotations

import errno
import math
import os
import socket
import time
from collections.abc import Callable

import trio

__all__ = [
    "SD_LISTEN_FDS_START",
    "extend_timeout",
    "listen_fds",
    "listen_fds_with_names",
    "notify",
    "ready",
    "reloading",
    "status",
    "stopping",
    "watchdog",
    "watchdog_interval",
    "watchdog_loop",
]

#: The first file descriptor systemd passes; the rest follow without gaps.
SD_LISTEN_FDS_START = 3

# A notification is a few hundred bytes at most and systemd reads them promptly; the timeout
# only bounds how long a wedged service manager could stall the caller's event loop.
_SEND_TIMEOUT = 1.0


def _notify_address(value: str) -> str | None:
    """The ``AF_UNIX`` address named by a ``$NOTIFY_SOCKET`` value, or None if unsupported."""
    if value.startswith("@"):
        # Abstract namespace: Python takes a leading NUL byte for it.
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    # systemd 254+ also knows "vsock:CID:PORT" (for virtual machines); the broker has no use
    # for it, and sd_notify(3) treats anything else as invalid.
    return None


def notify(state: str) -> bool:
    """Send *state* (``KEY=VALUE`` assignments, one per line) to systemd's ``$NOTIFY_SOCKET``.

    Returns True once the datagram has been sent; False when ``$NOTIFY_SOCKET`` is unset or
    empty (the process is not run by a ``Type=notify`` unit), names an address this module does
    not support, or the send fails. Never raises for those reasons: notification is advisory and
    a broker must keep serving even if systemd is unreachable. Blocks for at most a second.
    """
    value = os.environ.get("NOTIFY_SOCKET", "")
    if not value or not state:
        return False
    address = _notify_address(value)
    if address is None:
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.settimeout(_SEND_TIMEOUT)
            sock.sendto(state.encode("utf-8"), address)
    except OSError:
        return False
    return True


def _status_line(text: str) -> str:
    # One assignment per line: a newline inside the text would start a new (bogus) assignment.
    return "STATUS=" + " ".join(text.splitlines())


def ready(status: str | None = None) -> bool:
    """Tell systemd that start-up (or a reload) is complete: ``READY=1``, optionally with a status.

    ``systemctl start`` returns, and units ordered after this one start, only once this is sent.
    """
    lines = ["READY=1"]
    if status is not None:
        lines.append(_status_line(status))
    return notify("\n".join(lines))


def reloading(status: str | None = None) -> bool:
    """Tell systemd that a configuration reload begins; send :func:`ready` when it is done.

    Sends ``RELOADING=1`` with ``MONOTONIC_USEC=`` (the ``CLOCK_MONOTONIC`` time of the reload,
    which systemd 253+ requires for ``Type=notify-reload`` and earlier versions ignore).
    """
    usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    lines = ["RELOADING=1", f"MONOTONIC_USEC={usec}"]
    if status is not None:
        lines.append(_status_line(status))
    return notify("\n".join(lines))


def stopping(status: str | None = None) -> bool:
    """Tell systemd that the service is shutting down (``STOPPING=1``)."""
    lines = ["STOPPING=1"]
    if status is not None:
        lines.append(_status_line(status))
    return notify("\n".join(lines))


def watchdog() -> bool:
    """Send one watchdog heartbeat (``WATCHDOG=1``)."""
    return notify("WATCHDOG=1")


def status(text: str) -> bool:
    """Set the free-form status line that ``systemctl status`` shows (``STATUS=``)."""
    return notify(_status_line(text))


def extend_timeout(seconds: float) -> bool:
    """Ask systemd for *seconds* more before the current start, reload or stop times out.

    Sends ``EXTEND_TIMEOUT_USEC=``; useful while draining connections takes longer than
    ``TimeoutStopSec=`` would otherwise allow.
    """
    usec = max(0, math.ceil(seconds * 1_000_000))
    return notify(f"EXTEND_TIMEOUT_USEC={usec}")


def watchdog_interval() -> float | None:
    """The watchdog timeout systemd expects heartbeats within, in seconds, or None.

    None when ``$WATCHDOG_USEC`` is unset, not a positive integer, or when ``$WATCHDOG_PID`` is
    set and names another process (the variable was inherited from the real recipient).
    Heartbeats should be sent at least twice per interval.
    """
    raw_usec = os.environ.get("WATCHDOG_USEC", "")
    try:
        usec = int(raw_usec)
    except ValueError:
        return None
    if usec <= 0:
        return None
    raw_pid = os.environ.get("WATCHDOG_PID", "")
    if raw_pid:
        try:
            pid = int(raw_pid)
        except ValueError:
            return None
        if pid != os.getpid():
            return None
    return usec / 1_000_000


async def watchdog_loop(is_alive: Callable[[], bool], *, interval: float | None = None) -> None:
    """Send ``WATCHDOG=1`` every half *interval* for as long as ``is_alive()`` returns True.

    *interval* defaults to :func:`watchdog_interval`; when there is none (no ``WatchdogSec=``,
    or not run by systemd) this returns at once, so it can always be started in a nursery.
    While ``is_alive()`` is False no heartbeat is sent, and systemd treats the service as hung
    once the interval passes; heartbeats resume as soon as it is True again. ``is_alive`` must
    be cheap and must not block: it runs in the caller's event loop. Runs until cancelled.
    """
    if interval is None:
        interval = watchdog_interval()
    if interval is None or interval <= 0:
        return
    period = interval / 2
    while True:
        if is_alive():
            watchdog()
        await trio.sleep(period)


def _unset_listen_environment() -> None:
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(name, None)


def listen_fds_with_names(*, unset_environment: bool = True) -> list[tuple[str, socket.socket]]:
    """The sockets systemd passed to this process, each with its ``FileDescriptorName=``.

    Reads ``$LISTEN_FDS``, ``$LISTEN_PID`` and ``$LISTEN_FDNAMES``. Returns an empty list when
    they are absent, malformed, or meant for another process. Passed descriptors are marked
    close-on-exec (so a child gets one only through an explicit ``pass_fds=``) and, unless
    *unset_environment* is False, the three variables are removed from ``os.environ`` so that
    children do not believe the sockets are theirs; a second call then returns an empty list.
    A descriptor without a name (fewer names than descriptors) is called ``"unknown"``, as in
    ``sd_listen_fds_with_names(3)``; systemd's default name is the socket unit's name.

    The sockets keep the blocking mode and the listening state systemd gave them (a
    ``ListenStream=`` socket is already listening). Raises :class:`OSError` (``ENOTSOCK``) if
    a passed descriptor is not a socket, e.g. from ``ListenFIFO=``, which the broker does not use.
    """
    try:
        if os.environ.get("LISTEN_PID", "") != str(os.getpid()):
            return []
        try:
            count = int(os.environ.get("LISTEN_FDS", ""))
        except ValueError:
            return []
        if count <= 0:
            return []
        names = os.environ.get("LISTEN_FDNAMES", "").split(":")
    finally:
        if unset_environment:
            _unset_listen_environment()
    result: list[tuple[str, socket.socket]] = []
    for index in range(count):
        fd = SD_LISTEN_FDS_START + index
        os.set_inheritable(fd, False)
        name = names[index] if index < len(names) and names[index] else "unknown"
        try:
            sock = socket.socket(fileno=fd)
        except OSError as exc:
            if exc.errno == errno.ENOTSOCK:
                raise OSError(
                    errno.ENOTSOCK, f"systemd passed fd {fd} ({name!r}), which is not a socket"
                ) from exc
            raise
        result.append((name, sock))
    return result


def listen_fds(*, unset_environment: bool = True) -> list[socket.socket]:
    """The sockets systemd passed to this process (socket activation), in order; see
    :func:`listen_fds_with_names`. Empty when the process was not socket-activated."""
    return [sock for _, sock in listen_fds_with_names(unset_environment=unset_environment)]
