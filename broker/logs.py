"""Structured logging: one JSON object per line on stderr (journald and docker collect it).

Context that belongs to a task (the connection id, the worker) is bound with
``structlog.contextvars``; trio copies context variables into each new task, so what a
connection's task binds stays with that connection. Tokens and message payloads are never
passed to a logger.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog

__all__ = ["configure_logging", "get_logger"]


def configure_logging(level: str = "info") -> None:
    """Send structlog events as JSON lines to stderr at ``level`` and above."""
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(sort_keys=False),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        logger_factory=structlog.WriteLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )


def get_logger(**initial: Any) -> Any:
    """A bound logger, with ``initial`` key/values on every event."""
    return structlog.get_logger().bind(**initial)
