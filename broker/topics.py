"""Topic and pattern syntax, pattern algebra for permissions, and the subscription index.

A topic is 1 to 255 bytes of ``.``-separated segments, each ``[A-Za-z0-9_-]+``. A *pattern*
may also hold ``*`` (exactly one segment) and, only as its last segment, ``>`` (one or more
trailing segments). Exact topics are patterns too.

:class:`SubscriptionIndex` answers "who is subscribed to this topic?" without scanning every
pattern: exact subscriptions live in a dict, wildcard ones in a trie walked segment by segment,
so a lookup costs O(segments x wildcard branches), not O(patterns).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Generic, TypeVar

from broker.errors import FrameError

__all__ = [
    "SubscriptionIndex",
    "is_wildcard",
    "pattern_covers",
    "pattern_matches",
    "patterns_overlap",
    "validate_pattern",
    "validate_topic",
]

MAX_TOPIC_BYTES = 255
_SEGMENT = re.compile(r"[A-Za-z0-9_-]+\Z")
K = TypeVar("K")


def _validate(text: object, *, wildcards: bool) -> str:
    what = "topic pattern" if wildcards else "topic"
    if not isinstance(text, str):
        raise FrameError("bad_topic", f"{what} must be a string")
    size = len(text.encode("utf-8", "surrogatepass"))
    if not 1 <= size <= MAX_TOPIC_BYTES:
        raise FrameError("bad_topic", f"{what} must be 1 to {MAX_TOPIC_BYTES} bytes, not {size}")
    segments = text.split(".")
    for i, seg in enumerate(segments):
        if _SEGMENT.match(seg):
            continue
        if seg in ("*", ">") and not wildcards:
            raise FrameError("bad_topic", f"wildcards are not allowed here: {text!r}")
        if seg == "*":
            continue
        if seg == ">":
            if i != len(segments) - 1:
                raise FrameError("bad_topic", f"'>' may stand only last in {text!r}")
            continue
        allowed = "[A-Za-z0-9_-]+, '*' or a final '>'" if wildcards else "[A-Za-z0-9_-]+"
        raise FrameError(
            "bad_topic",
            f"bad segment {seg!r} in {text!r}: segments are {allowed}, separated by '.'",
        )
    return text


# The whole of a valid exact topic in one match: every publication is checked, and one regex
# over the string costs less than splitting it. Only ASCII matches, so its length is its size.
_EXACT_TOPIC = re.compile(r"[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)*\Z")


def validate_topic(topic: object) -> str:
    """Return ``topic`` if it is a valid exact topic; raise :class:`FrameError` (``bad_topic``)
    saying what is wrong otherwise."""
    if isinstance(topic, str) and len(topic) <= MAX_TOPIC_BYTES and _EXACT_TOPIC.match(topic):
        return topic
    return _validate(topic, wildcards=False)  # invalid: it says why


def validate_pattern(pattern: object) -> str:
    """Return ``pattern`` if it is a valid topic or wildcard pattern; raise
    :class:`FrameError` (``bad_topic``) otherwise."""
    return _validate(pattern, wildcards=True)


def is_wildcard(pattern: str) -> bool:
    """Whether a (valid) pattern holds a wildcard segment."""
    return "*" in pattern or pattern == ">" or pattern.endswith(".>")


def pattern_matches(pattern: str, topic: str) -> bool:
    """Whether exact ``topic`` matches ``pattern`` (both assumed valid)."""
    # The common shapes of permission patterns without splitting: exact, 'a.b.>' and '>'.
    if "*" not in pattern:
        if pattern[-1] != ">":
            return pattern == topic
        prefix = pattern[:-1]  # '' or ending with '.'
        return len(topic) > len(prefix) and topic.startswith(prefix)
    p = pattern.split(".")
    t = topic.split(".")
    for i, seg in enumerate(p):
        if seg == ">":
            return len(t) > i
        if i >= len(t) or (seg != "*" and seg != t[i]):
            return False
    return len(p) == len(t)


def pattern_covers(general: str, specific: str) -> bool:
    """Whether every topic matched by pattern ``specific`` is matched by pattern ``general``."""
    g = general.split(".")
    s = specific.split(".")
    for i, seg in enumerate(g):
        if seg == ">":
            # '>' needs at least one more segment; anything in ``specific`` from here on gives one.
            return len(s) > i
        if i >= len(s) or s[i] == ">":
            return False
        if seg != "*" and seg != s[i]:
            return False
        # a '*' in general covers both a literal and a '*' in specific.
    return len(g) == len(s)


def patterns_overlap(a: str, b: str) -> bool:
    """Whether some exact topic matches both patterns."""
    x = a.split(".")
    y = b.split(".")
    for i in range(max(len(x), len(y))):
        sx = x[i] if i < len(x) else None
        sy = y[i] if i < len(y) else None
        if sx == ">":
            return sy is not None
        if sy == ">":
            return sx is not None
        if sx is None or sy is None:
            return False
        if sx != "*" and sy != "*" and sx != sy:
            return False
    return True


class _Node(Generic[K]):
    __slots__ = ("children", "here", "rest")

    def __init__(self) -> None:
        self.children: dict[str, _Node[K]] = {}
        self.here: dict[K, None] = {}  # keys whose pattern ends at this node
        self.rest: dict[K, None] = {}  # keys whose pattern ends with '>' at this node


class SubscriptionIndex(Generic[K]):
    """Maps patterns to sets of keys and finds every key whose pattern matches a topic.

    Keys are any hashable values (the router uses subscription objects). Insertion order is
    kept, so deliveries to the subscribers of one topic happen in subscription order.
    """

    def __init__(self) -> None:
        self.exact: dict[str, dict[K, None]] = {}
        self._root: _Node[K] = _Node()
        #: Keys registered under wildcard patterns (read it, never set it): an attribute, not
        #: a property, as every publication asks (the router: any wildcard to look at?).
        self.wildcards = 0

    def add(self, pattern: str, key: K) -> bool:
        """Add ``key`` under ``pattern``. Returns True if the pattern had no key before."""
        if not is_wildcard(pattern):
            keys = self.exact.setdefault(pattern, {})
            first = not keys
            keys[key] = None
            return first
        node = self._root
        segments = pattern.split(".")
        for seg in segments[:-1]:
            node = node.children.setdefault(seg, _Node())
        last = segments[-1]
        if last == ">":
            bucket = node.rest
        else:
            node = node.children.setdefault(last, _Node())
            bucket = node.here
        first = not bucket
        if key not in bucket:
            self.wildcards += 1
        bucket[key] = None
        return first

    def remove(self, pattern: str, key: K) -> bool:
        """Remove ``key`` from ``pattern``. Returns True if the pattern has no key left."""
        if not is_wildcard(pattern):
            keys = self.exact.get(pattern)
            if keys is None:
                return False
            keys.pop(key, None)
            if not keys:
                del self.exact[pattern]
                return True
            return False
        path: list[tuple[_Node[K], str]] = []
        node = self._root
        segments = pattern.split(".")
        for seg in segments[:-1]:
            child = node.children.get(seg)
            if child is None:
                return False
            path.append((node, seg))
            node = child
        last = segments[-1]
        if last == ">":
            bucket = node.rest
        else:
            child = node.children.get(last)
            if child is None:
                return False
            path.append((node, last))
            node = child
            bucket = node.here
        if key in bucket:
            del bucket[key]
            self.wildcards -= 1
        empty = not bucket
        # Prune empty branches so a churn of patterns does not grow the trie forever.
        while path and not (node.children or node.here or node.rest):
            parent, seg = path.pop()
            del parent.children[seg]
            node = parent
        return empty

    def has(self, pattern: str) -> bool:
        """Whether any key is registered under exactly ``pattern``."""
        if not is_wildcard(pattern):
            return pattern in self.exact
        node = self._root
        segments = pattern.split(".")
        for seg in segments[:-1]:
            child = node.children.get(seg)
            if child is None:
                return False
            node = child
        if segments[-1] == ">":
            return bool(node.rest)
        child = node.children.get(segments[-1])
        return child is not None and bool(child.here)

    @property
    def has_wildcards(self) -> bool:
        return self.wildcards > 0

    def match(self, topic: str) -> Iterator[K]:
        """Yield the keys whose pattern matches ``topic``: exact ones first, then wildcard
        ones. A key registered under several matching patterns may be yielded more than once;
        callers that need each key once dedupe."""
        for keys in self.buckets(topic):
            yield from list(keys)

    def buckets(self, topic: str) -> list[dict[K, None]]:
        """The key sets of every pattern that matches ``topic``, exact first, each non-empty,
        in :meth:`match`'s order. Within one set each key is there once; a key may be in
        several. The sets are the index's own, not copies: a caller may iterate one while it
        does not add or remove keys meanwhile.

        Why not only :meth:`match`: a publication's fan-out asks this once per publication,
        and a generator that copies each set and yields key by key was most of what a
        wildcard subscription cost there; with one set (the usual case) there is nothing to
        dedupe and the set itself is the answer."""
        found: list[dict[K, None]] = []
        keys = self.exact.get(topic)
        if keys:
            found.append(keys)
        if not self.wildcards:
            return found
        segments = topic.split(".")
        n = len(segments)
        stack: list[tuple[_Node[K], int]] = [(self._root, 0)]
        while stack:
            node, i = stack.pop()
            if i == n:
                if node.here:
                    found.append(node.here)
                continue
            if node.rest:
                found.append(node.rest)
            children = node.children
            if children:
                child = children.get(segments[i])
                if child is not None:
                    stack.append((child, i + 1))
                star = children.get("*")
                if star is not None:
                    stack.append((star, i + 1))
        return found

    def __len__(self) -> int:
        return sum(len(v) for v in self.exact.values()) + self.wildcards
