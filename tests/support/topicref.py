"""An independent topic matcher for tests: a pattern as a regular expression."""

from __future__ import annotations

import re


def reference_match(pattern: str, topic: str) -> bool:
    """An independent matcher: the pattern as a regular expression."""
    parts = []
    for seg in pattern.split("."):
        if seg == "*":
            parts.append(r"[^.]+")
        elif seg == ">":
            parts.append(r"[^.]+(?:\.[^.]+)*")
        else:
            parts.append(re.escape(seg))
    return re.fullmatch(r"\.".join(parts), topic) is not None
