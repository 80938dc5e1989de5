"""Topic syntax, pattern algebra and the subscription index, against a reference matcher."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.errors import FrameError
from broker.topics import (
    SubscriptionIndex,
    pattern_covers,
    pattern_matches,
    patterns_overlap,
    validate_pattern,
    validate_topic,
)
from tests.support.topicref import reference_match

SEGMENTS = st.sampled_from(["a", "b", "c", "news", "x-1", "Z_9"])
topics = st.lists(SEGMENTS, min_size=1, max_size=5).map(".".join)


@st.composite
def patterns(draw: st.DrawFn) -> str:
    tail = draw(st.booleans())  # a final '>' (and then '>' alone is a pattern too)
    segs = draw(st.lists(st.one_of(SEGMENTS, st.just("*")), min_size=0 if tail else 1, max_size=5))
    if tail:
        segs.append(">")
    return ".".join(segs)


@given(patterns(), topics)
def test_pattern_matches_agrees_with_reference(pattern: str, topic: str) -> None:
    assert pattern_matches(pattern, topic) == reference_match(pattern, topic)


@given(patterns(), patterns(), st.lists(topics, min_size=1, max_size=30))
def test_covers_and_overlap_are_sound(a: str, b: str, sample: list[str]) -> None:
    for t in sample:
        if pattern_covers(a, b) and pattern_matches(b, t):
            assert pattern_matches(a, t)
        if pattern_matches(a, t) and pattern_matches(b, t):
            assert patterns_overlap(a, b)


@given(patterns())
def test_a_pattern_covers_and_overlaps_itself(p: str) -> None:
    assert pattern_covers(p, p)
    assert patterns_overlap(p, p)


@settings(max_examples=200)
@given(st.lists(st.tuples(patterns() | topics, st.integers(0, 5)), max_size=25), topics)
def test_index_finds_exactly_the_matching_keys(entries: list[tuple[str, int]], topic: str) -> None:
    index: SubscriptionIndex[int] = SubscriptionIndex()
    for pattern, key in entries:
        index.add(pattern, key)
    expected = {key for pattern, key in entries if reference_match(pattern, topic)}
    assert set(index.match(topic)) == expected
    for pattern, key in entries:
        index.remove(pattern, key)
    assert list(index.match(topic)) == []
    assert len(index) == 0
    assert not index.has_wildcards


@settings(max_examples=200)
@given(st.lists(st.tuples(patterns() | topics, st.integers(0, 5)), max_size=25), topics)
def test_buckets_are_the_matching_patterns_key_sets(
    entries: list[tuple[str, int]], topic: str
) -> None:
    index: SubscriptionIndex[int] = SubscriptionIndex()
    for pattern, key in entries:
        index.add(pattern, key)
    buckets = index.buckets(topic)
    matching = {pattern for pattern, _ in entries if reference_match(pattern, topic)}
    # one non-empty set per matching pattern, holding exactly that pattern's keys
    assert sorted(sorted(b) for b in buckets) == sorted(
        sorted({k for p, k in entries if p == pattern}) for pattern in matching
    )
    assert [k for b in buckets for k in b] == list(index.match(topic))


@pytest.mark.parametrize(
    "topic",
    ["a", "chat.room1", "a-b_c.D9", "x" * 255, ".".join(["s"] * 100)],
)
def test_valid_topics(topic: str) -> None:
    assert validate_topic(topic) == topic


@pytest.mark.parametrize(
    "topic",
    ["", "a..b", ".a", "a.", "a b", "a.*", "a.>", "é", "x" * 256, 5, None, "a/b", "a\n", "a.b\n"],
)
def test_invalid_topics(topic: object) -> None:
    with pytest.raises(FrameError) as info:
        validate_topic(topic)
    assert info.value.code == "bad_topic"


@pytest.mark.parametrize("pattern", ["a.*", "a.>", ">", "*", "*.b.>", "a"])
def test_valid_patterns(pattern: str) -> None:
    assert validate_pattern(pattern) == pattern


@pytest.mark.parametrize("pattern", ["a.>.b", "a.**", "a.b*", ">.a", "a.>x", ""])
def test_invalid_patterns(pattern: str) -> None:
    with pytest.raises(FrameError):
        validate_pattern(pattern)


def test_gt_needs_at_least_one_segment() -> None:
    assert not pattern_matches("a.>", "a")
    assert pattern_matches("a.>", "a.b.c")
    assert not pattern_covers("a.>", "a")
    assert pattern_covers("a.>", "a.*.c")
    assert not pattern_covers("a.*", "a.>")


@given(
    st.lists(st.tuples(patterns() | topics, st.integers(0, 3)), max_size=15), patterns() | topics
)
def test_index_has_agrees_with_its_contents(entries: list[tuple[str, int]], probe: str) -> None:
    index: SubscriptionIndex[int] = SubscriptionIndex()
    for pattern, key in entries:
        index.add(pattern, key)
    assert index.has(probe) == any(pattern == probe for pattern, _ in entries)


@pytest.mark.parametrize(
    ("check", "text", "says"),
    [
        (validate_pattern, "*.a b", "bad segment 'a b'"),
        (validate_pattern, "a.>.b", "'>' may stand only last"),
        (validate_pattern, "", "must be 1 to 255 bytes, not 0"),
        (validate_topic, "x" * 256, "must be 1 to 255 bytes, not 256"),
        (validate_topic, "a.*", "wildcards are not allowed here"),
        (validate_topic, 5, "topic must be a string"),
    ],
)
def test_a_refusal_says_what_is_wrong(check: Any, text: object, says: str) -> None:
    """The error reply's message is the client's only hint: each refusal names its reason."""
    with pytest.raises(FrameError) as info:
        check(text)
    assert info.value.code == "bad_topic"
    assert says in info.value.message


@pytest.mark.parametrize("pattern", ["a.b", "a.*.c", "a.>", ">", "*"])
def test_index_add_and_remove_report_the_first_and_the_last_key(pattern: str) -> None:
    index: SubscriptionIndex[str] = SubscriptionIndex()
    assert index.add(pattern, "k1") is True
    assert index.add(pattern, "k1") is False  # the same key again: counted once
    assert index.add(pattern, "k2") is False
    assert len(index) == 2 and index.has(pattern)
    assert index.remove(pattern, "unknown") is False and len(index) == 2
    assert index.remove("x.y.z", "k1") is False and index.remove("x.*", "k1") is False
    assert index.remove(pattern, "k1") is False and len(index) == 1
    assert index.remove(pattern, "k2") is True
    assert len(index) == 0 and not index.has(pattern) and not index.has_wildcards
    # Pruned: a churn of patterns does not grow the trie.
    assert not index.exact and not index._root.children
    assert not index._root.here and not index._root.rest


def test_index_yields_keys_in_subscription_order() -> None:
    index: SubscriptionIndex[int] = SubscriptionIndex()
    for key in (3, 1, 2):
        index.add("a.b", key)
    for key in (9, 7):
        index.add("a.*", key)
    assert list(index.match("a.b")) == [3, 1, 2, 9, 7]
