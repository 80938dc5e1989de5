"""The open-file limit: raised to the hard limit at start, and the room it leaves logged.

Every connection is a file descriptor. The usual soft limit (1,024 on many systems) is far
below what a broker is configured for, while the hard limit (as far as an unprivileged
process may raise its own soft limit) is usually much higher. So every broker process, the
supervisor and each worker, raises its soft limit to the hard one before it listens, and says
in one log line how many connections that leaves room for; a worker whose limits
(``limits.max_connections`` plus ``limits.max_pending_connections``) do not fit logs it as a
warning, since connections past the file limit would fail at ``accept`` instead of being
answered.
"""

from __future__ import annotations

import resource
from pathlib import Path

import attrs
import structlog

__all__ = ["FileLimit", "log_file_limit", "raise_file_limit"]

log = structlog.get_logger()

#: Descriptors a process needs besides its clients' sockets: listeners, the hub link, the
#: event loop's own, log and configuration files, the operations listener's connections.
RESERVED_FDS = 128


@attrs.frozen
class FileLimit:
    """The open-file limit before and after raising it (``hard`` is -1 when unlimited)."""

    before: int
    soft: int
    hard: int

    @property
    def connections(self) -> int:
        """How many client connections fit beside :data:`RESERVED_FDS`."""
        return max(0, self.soft - RESERVED_FDS)


def _nr_open() -> int:
    """Linux's ceiling for any process's open-file limit (``fs.nr_open``)."""
    try:
        return int(Path("/proc/sys/fs/nr_open").read_text())
    except (OSError, ValueError):
        return 1 << 20  # the kernel's default


def raise_file_limit() -> FileLimit:
    """Raise this process's soft open-file limit to its hard limit; return both. Never
    raises: a system that refuses keeps the limit it had."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    before = soft
    target = _nr_open() if hard == resource.RLIM_INFINITY else hard
    if soft == resource.RLIM_INFINITY or target <= soft:
        target = soft
    else:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    infinite = resource.RLIM_INFINITY
    return FileLimit(
        before=-1 if before == infinite else before,
        soft=-1 if soft == infinite else soft,
        hard=-1 if hard == infinite else hard,
    )


def log_file_limit(limit: FileLimit, *, needed: int | None) -> None:
    """One log line with the limit and the client connections it leaves room for.
    ``needed`` is what this process's limits may ask for (None: it serves no clients)."""
    fields = {
        "limit": limit.soft,
        "hard": limit.hard,
        "raised_from": limit.before,
        "connections": limit.connections if limit.soft >= 0 else None,
    }
    if needed is None or limit.soft < 0 or limit.connections >= needed:
        log.info("open_files", **fields, needed=needed)
    else:
        log.warning(
            "open_files",
            **fields,
            needed=needed,
            problem="limits.max_connections + limits.max_pending_connections do not fit "
            "in the open-file limit; raise LimitNOFILE= (systemd) or ulimit -n, or lower them",
        )
