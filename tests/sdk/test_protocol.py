"""The SDK's sans-I/O core: frames, topic matching, and the recovery bookkeeping that decides
what a subscription yields (messages in order, no duplicates, explicit gaps)."""

from __future__ import annotations

import datetime
import functools
import json
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from client_sdk._protocol import (
    Codec,
    ProtocolViolation,
    Reply,
    Requests,
    Skipped,
    UnknownPush,
    decode,
    encode,
    history_frame,
    json_default,
    parse_history,
    parse_missed,
    parse_presence,
    parse_url,
    rejection,
    reply_int,
    subscribe_frame,
)
from client_sdk._recovery import Tracker, is_pattern, topic_matches
from client_sdk._schedule import reconnect_delay, reconnect_hint, refresh_delay
from client_sdk.errors import (
    Forbidden,
    InternalError,
    RateLimited,
    TooManyTopics,
    error_from_reply,
)
from client_sdk.models import Gap, Message, Position, PresenceEvent, Welcome


def msg(offset: int, epoch: str = "e1", topic: str = "chat.a") -> Message:
    return Message(topic, offset, epoch, {"n": offset}, "alice")


def test_decode_each_frame_kind() -> None:
    m = decode('{"op":"message","topic":"t","offset":3,"epoch":"e","from":null,"data":[1]}')
    assert m == Message("t", 3, "e", [1], None)
    assert decode('{"op":"join","topic":"t","client":"bob"}') == PresenceEvent("join", "t", "bob")
    w = decode('{"op":"welcome","client":"a","expires_at":null,"node":"n","worker":0}')
    assert isinstance(w, Welcome) and w.client == "a" and w.expires_at is None and w.worker == 0
    ok = decode('{"id":7,"ok":true,"offset":1}')
    assert ok == Reply(7, True, {"id": 7, "ok": True, "offset": 1})
    err = decode('{"id":8,"ok":false,"error":{"code":"forbidden","message":"no"}}')
    assert isinstance(err, Reply) and err.error_code == "forbidden" and err.error_message == "no"


def test_decode_leaves_and_keeps_unknown_pushes_whole() -> None:
    assert decode('{"op":"leave","topic":"t","client":"b"}') == PresenceEvent("leave", "t", "b")
    assert decode('{"op":"later","x":1}') == UnknownPush("later", {"op": "later", "x": 1})


def test_parse_url_keeps_the_query_and_defaults_the_port_and_path() -> None:
    assert parse_url("ws://h:1/ws") == ("h", 1, "/ws", False)
    assert parse_url("wss://h/ws?token=x") == ("h", 443, "/ws?token=x", True)
    assert parse_url("ws://h") == ("h", 80, "/", False)
    with pytest.raises(ValueError):
        parse_url("http://h/ws")


@pytest.mark.parametrize(
    "text",
    [
        b"{}",
        "not json",
        "[1]",
        '{"op":"message","topic":"t","offset":"3","epoch":"e"}',
        '{"op":"message","topic":"t","offset":true,"epoch":"e"}',
        '{"id":1,"ok":false}',
        "{}",
    ],
)
def test_decode_rejects_malformed_frames(text: str | bytes) -> None:
    with pytest.raises(ProtocolViolation):
        decode(text)


def test_encode_is_compact_json_and_refuses_nan() -> None:
    assert encode({"op": "publish", "data": "é"}) == '{"op":"publish","data":"é"}'
    with pytest.raises(ValueError, match=r"data\['x'\]\[1\] = nan \(float\)"):
        encode({"op": "publish", "topic": "t", "data": {"x": [1, float("nan")]}})


@pytest.mark.parametrize(
    ("pattern", "topic", "expected"),
    [
        ("a.b", "a.b", True),
        ("a.*", "a.b", True),
        ("a.*", "a.b.c", False),
        ("a.>", "a.b.c", True),
        ("a.>", "a", False),
        (">", "a", True),
        ("*.b", "a.b", True),
        ("*.b", "a.c", False),
        ("a.*.c", "a.x.c", True),
    ],
)
def test_topic_matches(pattern: str, topic: str, expected: bool) -> None:
    assert topic_matches(pattern, topic) is expected


def test_reconnect_hint_is_read_from_a_1001_reason() -> None:
    assert reconnect_hint("shutting down; reconnect_after_ms=1234") == 1.234
    assert reconnect_hint("bye") is None
    assert reconnect_hint(None) is None


def test_the_close_code_decides_the_reconnect_delay(monkeypatch: pytest.MonkeyPatch) -> None:
    # Full jitter draws in [0, ceiling]: take the ceiling, so the delay shows the schedule.
    monkeypatch.setattr(random, "uniform", lambda low, high: high)
    assert reconnect_delay(4003, "token expired", 5, 0.25, 10.0) == 0.0  # a fresh token, now
    assert reconnect_delay(1006, None, 0, 0.25, 10.0) == 0.25
    assert reconnect_delay(1011, None, 3, 0.25, 10.0) == 2.0
    assert reconnect_delay(1011, None, 10, 0.25, 10.0) == 10.0  # capped
    assert reconnect_delay(1001, "bye; reconnect_after_ms=3000", 1, 0.25, 10.0) == 3.5
    assert reconnect_delay(1000, "reconnect_after_ms=3000", 0, 0.25, 10.0) == 0.25  # 1001 only


def test_a_token_is_renewed_with_a_fifth_of_its_lifetime_left_within_bounds() -> None:
    assert refresh_delay(100.0) == 80.0
    assert refresh_delay(3600.0) == 3570.0  # at most 30 s ahead
    assert refresh_delay(3.0) == 2.0  # at least 1 s ahead
    assert refresh_delay(0.5) == refresh_delay(-60.0) == 1.0  # never a busy loop


def test_an_http_rejection_body_names_its_error() -> None:
    body = b'{"error": {"code": "unavailable", "message": "full"}}'
    assert rejection(body) == ("unavailable", "full")
    assert rejection(None) == rejection(b"<html>") == rejection(b"[1]") == (None, "")


def test_subscribe_frames() -> None:
    assert subscribe_frame("a", None, False) == {"op": "subscribe", "topic": "a"}
    assert subscribe_frame("a", Position(4, "e"), True) == {
        "op": "subscribe",
        "topic": "a",
        "since": {"offset": 4, "epoch": "e"},
        "presence": True,
    }


def test_history_presence_and_publish_replies_are_parsed_or_refused() -> None:
    item = {"op": "message", "topic": "t", "offset": 2, "epoch": "e", "data": 1}
    fields = {"ok": True, "messages": [item, 7], "offset": 2, "epoch": "e", "recovered": True}
    history = parse_history("t", fields)
    assert history.messages == (Message("t", 2, "e", 1, None),) and history.offset == 2
    assert (history.epoch, history.recovered, history.missed) == ("e", True, None)
    for bad in ({**fields, "messages": None}, {**fields, "offset": "2"}):
        with pytest.raises(ProtocolViolation):
            parse_history("t", bad)
    assert parse_presence({"clients": ["a", "b"]}) == ("a", "b")
    with pytest.raises(ProtocolViolation):
        parse_presence({"clients": "a"})
    assert reply_int({"offset": 9}, "offset") == 9
    with pytest.raises(ProtocolViolation):
        reply_int({"offset": True}, "offset")


def test_a_tracker_covers_its_topic_or_what_its_pattern_matches() -> None:
    assert Tracker("chat.a").covers("chat.a") and not Tracker("chat.a").covers("chat.b")
    assert Tracker("chat.*").covers("chat.b") and not Tracker("chat.*").covers("news.b")


def test_history_frames_ask_for_the_oldest_or_the_newest_never_both() -> None:
    assert history_frame("t", None, None, None) == {"op": "history", "topic": "t"}
    assert history_frame("t", Position(4, "e"), 2, None) == {
        "op": "history",
        "topic": "t",
        "since": {"offset": 4, "epoch": "e"},
        "limit": 2,
    }
    assert history_frame("t", None, None, 3) == {"op": "history", "topic": "t", "last": 3}
    with pytest.raises(ValueError, match="not both"):
        history_frame("t", None, 2, 3)


def test_errors_are_typed_by_code() -> None:
    assert isinstance(error_from_reply("forbidden", "x"), Forbidden)
    assert isinstance(error_from_reply("rate_limited", "x"), RateLimited)
    assert isinstance(error_from_reply("too_many_topics", "x"), TooManyTopics)
    unknown = error_from_reply("something_new", "x")
    assert isinstance(unknown, InternalError) and unknown.code == "something_new"


def test_first_subscribe_starts_at_the_topics_latest_offset() -> None:
    t = Tracker("chat.a")
    assert t.since() is None
    assert t.subscribed({"offset": 5, "epoch": "e1"}, None) == []
    assert t.since() == Position(5, "e1")
    assert t.message(msg(6)) == [msg(6)]
    assert t.since() == Position(6, "e1")


def test_duplicates_are_dropped_and_do_not_move_the_position_back() -> None:
    t = Tracker("chat.a")
    t.subscribed({"offset": 0, "epoch": "e1"}, None)
    assert t.message(msg(1)) == [msg(1)]
    assert t.message(msg(2)) == [msg(2)]
    assert t.message(msg(1)) == []
    assert t.message(msg(2)) == []
    assert t.since() == Position(2, "e1")


def test_recovered_resubscribe_reports_nothing() -> None:
    t = Tracker("chat.a")
    t.subscribed({"offset": 3, "epoch": "e1"}, None)
    sent = t.since()
    assert t.subscribed({"offset": 9, "epoch": "e1", "recovered": True}, sent) == []
    assert [e for o in range(4, 10) for e in t.message(msg(o))] == [msg(o) for o in range(4, 10)]


def test_unrecovered_resubscribe_names_the_missed_offsets() -> None:
    t = Tracker("chat.a", since=Position(3, "e1"))
    fields = {"offset": 20, "epoch": "e1", "recovered": False, "missed": {"from": 4, "to": 10}}
    [gap] = t.subscribed(fields, t.since())
    assert gap == Gap("chat.a", 4, 10, "e1", False, "not_recovered", Position(3, "e1"))
    assert gap.count == 7
    assert t.since() == Position(10, "e1")  # what is lost is reported once, not again
    assert t.message(msg(11)) == [msg(11)]


def test_epoch_change_is_a_gap_even_when_nothing_of_the_new_epoch_is_lost() -> None:
    t = Tracker("chat.a", since=Position(7, "old"))
    fields = {"offset": 2, "epoch": "new", "recovered": False, "missed": {"from": 1, "to": 0}}
    [gap] = t.subscribed(fields, t.since())
    assert gap.epoch_changed and gap.reason == "epoch_changed"
    assert (gap.from_offset, gap.to_offset, gap.count) == (None, None, None)
    assert gap.previous == Position(7, "old")
    # the replay of the new epoch follows, from offset 1
    assert t.message(msg(1, "new")) == [msg(1, "new")]


def test_live_offset_jump_and_epoch_change_are_reported_before_the_message() -> None:
    t = Tracker("chat.a")
    t.subscribed({"offset": 1, "epoch": "e1"}, None)
    out = t.message(msg(4))
    assert out[1] == msg(4)
    assert isinstance(out[0], Gap) and (out[0].from_offset, out[0].to_offset) == (2, 3)
    out = t.message(msg(3, "e2"))
    assert isinstance(out[0], Gap) and out[0].epoch_changed and out[0].to_offset == 2


def test_a_live_epoch_change_to_offset_1_is_a_gap_of_unknown_size() -> None:
    t = Tracker("chat.a")
    t.subscribed({"offset": 5, "epoch": "e1"}, None)
    assert t.since() == Position(5, "e1")  # a reconnect resumes from the moment of subscribing
    gap, first = t.message(msg(1, "e2"))
    assert gap == Gap("chat.a", None, None, "e2", True, "epoch_changed", Position(5, "e1"))
    assert first == msg(1, "e2") and t.since() == Position(1, "e2")


def test_wildcard_reconnect_is_reported_as_a_possible_gap() -> None:
    t = Tracker("chat.*")
    assert t.since() is None
    assert t.subscribed({"offset": None, "epoch": None}, None) == []
    assert t.message(msg(5, topic="chat.a")) == [msg(5, topic="chat.a")]
    assert t.message(msg(5, topic="chat.a")) == []  # deduplicated per exact topic
    [gap] = t.subscribed({"offset": None, "epoch": None}, None)
    assert gap.reason == "wildcard_reconnect" and gap.topic == "chat.*" and gap.count is None
    assert "possibly" in gap.describe()


@given(
    st.lists(st.integers(min_value=1, max_value=40), max_size=80),
    st.integers(min_value=0, max_value=5),
)
def test_tracker_output_is_ordered_unique_and_gaps_cover_exactly_the_missing(
    arrivals: list[int], start: int
) -> None:
    """Whatever order, duplicates and losses the wire shows, a subscription yields increasing
    offsets, each once, and every offset it skipped is named by exactly one gap."""
    t = Tracker("chat.a")
    t.subscribed({"offset": start, "epoch": "e1"}, None)
    delivered: list[int] = []
    covered: list[int] = []
    for offset in arrivals:
        for event in t.message(msg(offset)):
            if isinstance(event, Message):
                delivered.append(event.offset)
            else:
                assert isinstance(event, Gap) and event.reason == "offset_jump"
                assert event.from_offset is not None and event.to_offset is not None
                covered.extend(range(event.from_offset, event.to_offset + 1))
    assert delivered == sorted(set(delivered)) and all(o > start for o in delivered)
    if delivered:
        expected_missing = sorted(set(range(start + 1, delivered[-1] + 1)) - set(delivered))
        assert covered == expected_missing
    else:
        assert covered == []


def test_decode_reads_every_welcome_field_and_defaults_a_bare_error() -> None:
    w = decode(
        '{"op":"welcome","client":"a","expires_at":1700000000,"node":"n","worker":true,'
        '"ping_interval":20,"idle_timeout":60.5}'
    )
    assert w == Welcome("a", 1700000000.0, "n", None, 20.0, 60.5)  # a bool is not a worker
    bare = decode('{"id":"x","ok":false,"error":{}}')
    assert isinstance(bare, Reply) and bare.id == "x" and not bare.ok
    assert (bare.error_code, bare.error_message) == ("internal", "")
    for text in (
        '{"ok":1}',
        '{"op":"welcome","client":"a","expires_at":true}',
        '{"op":"message","topic":"t","offset":1,"epoch":"e","from":7}',
        '{"op":"join","topic":"t"}',
        '{"op":7}',
    ):
        with pytest.raises(ProtocolViolation):
            decode(text)


def test_is_pattern_and_parse_missed() -> None:
    assert is_pattern("a.*") and is_pattern(">") and is_pattern("a.>")
    assert not is_pattern("a.b") and not is_pattern("a*b.c>")
    assert parse_missed({"missed": {"from": 2, "to": 5}}) == (2, 5)
    assert parse_missed({"missed": None}) is None and parse_missed({}) is None
    with pytest.raises(ProtocolViolation):
        parse_missed({"missed": {"from": "2", "to": 5}})


def test_a_recovered_resubscribe_resumes_from_where_it_was() -> None:
    t = Tracker("chat.a", since=Position(3, "e1"))
    assert t.subscribed({"offset": 9, "epoch": "e1", "recovered": True}, t.since()) == []
    assert t.since() == Position(3, "e1")  # the replay of 4..9 follows
    assert t.message(msg(4)) == [msg(4)]


def test_an_unrecovered_resubscribe_without_missed_assumes_the_worst() -> None:
    t = Tracker("chat.a", since=Position(3, "e1"))
    [gap] = t.subscribed({"offset": 9, "epoch": "e1", "recovered": False}, t.since())
    assert gap == Gap("chat.a", 4, 9, "e1", False, "not_recovered", Position(3, "e1"))
    assert t.since() == Position(9, "e1")
    # ... and in a new epoch, everything of it up to its latest offset
    t = Tracker("chat.a", since=Position(3, "old"))
    [gap] = t.subscribed({"offset": 2, "epoch": "new", "recovered": False}, t.since())
    assert (gap.from_offset, gap.to_offset, gap.epoch_changed) == (1, 2, True)


def test_an_empty_missed_range_in_the_same_epoch_is_no_gap() -> None:
    t = Tracker("chat.a", since=Position(3, "e1"))
    fields = {"offset": 3, "epoch": "e1", "recovered": False, "missed": {"from": 4, "to": 3}}
    assert t.subscribed(fields, t.since()) == []
    assert t.since() == Position(3, "e1")


def test_a_skipped_push_is_a_gap_with_its_reason_and_the_next_message_follows_on() -> None:
    push = decode('{"op":"skipped","topic":"chat.a","from":3,"to":9,"epoch":"e1"}')
    assert isinstance(push, Skipped)
    t = Tracker("chat.a")
    t.subscribed({"offset": 0, "epoch": "e1"}, None)
    assert t.message(msg(1)) == [msg(1)]
    assert t.message(msg(2)) == [msg(2)]
    assert t.skipped(push) == [Gap("chat.a", 3, 9, "e1", False, "skipped", Position(2, "e1"))]
    assert t.since() == Position(9, "e1")  # a reconnect resumes after it, no replay
    assert t.message(msg(10)) == [msg(10)]  # no offset_jump on top of it
    assert t.skipped(push) == []  # a range already behind us says nothing


def test_an_encode_error_names_what_the_dumps_hook_refused() -> None:
    codec = Codec(dumps=functools.partial(json.dumps, default=json_default))
    when = datetime.datetime(2026, 1, 2, tzinfo=datetime.UTC)
    assert '"2026-01-02T00:00:00+00:00"' in encode({"op": "publish", "data": when}, codec)
    # The hook encodes the datetime; what it refuses is the object after it.
    with pytest.raises(TypeError, match=r"data\[1\] = <object object .*> \(object\)"):
        encode({"op": "publish", "topic": "t", "data": [when, object()]}, codec)
    with pytest.raises(TypeError, match=r"data key \(1, 2\)"):
        encode({"op": "publish", "topic": "t", "data": {(1, 2): 3}})


def test_requests_get_fresh_ids_and_replies_find_their_request() -> None:
    requests = Requests()
    woken: list[int] = []
    a = requests.open({"op": "publish", "data": 1}, Codec(), lambda: woken.append(1))
    b = requests.open({"op": "publish", "data": "x" * 50}, Codec(), lambda: woken.append(2))
    assert (a.id, b.id) == (1, 2) and json.loads(b.text)["id"] == 2 and len(requests) == 2
    assert requests.match(Reply(id=2, ok=True, fields={})) is b
    assert requests.match(Reply(id=3, ok=True, fields={})) is None
    assert requests.match(Reply(id=None, ok=False, fields={})) is None
    b.finish(reply=Reply(id=2, ok=True, fields={}))
    b.finish(error=RuntimeError("late"))  # ignored: the outcome is set once
    assert woken == [2] and b.error is None
    requests.close(b)
    assert requests.match(Reply(id=2, ok=True, fields={})) is None
    c = requests.open({"op": "history"}, Codec(), lambda: woken.append(3))
    assert c.id == 3  # ids are never reused


def test_a_1009_close_fails_the_largest_request_as_too_large() -> None:
    requests = Requests()
    small = requests.open({"op": "publish", "data": 1}, Codec(), lambda: None)
    big = requests.open({"op": "publish", "data": "x" * 100}, Codec(), lambda: None)
    lost, too_large = ConnectionError("lost"), ValueError("too large")
    requests.fail_all(lost, too_large=too_large)
    assert (small.error, big.error) == (lost, too_large) and len(requests) == 0
    other = requests.open({"op": "ping"}, Codec(), lambda: None)
    requests.fail_all(lost)
    assert other.error is lost


def test_a_dumps_hook_may_return_bytes_as_orjson_does() -> None:
    codec = Codec(dumps=lambda obj: json.dumps(obj).encode(), loads=json.loads)
    assert encode({"op": "publish", "data": "é"}, codec) == '{"op": "publish", "data": "\\u00e9"}'
