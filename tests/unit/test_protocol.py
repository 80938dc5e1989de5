"""The sans-I/O protocol layer: parsing, encoding and framing (fuzzed in tests/fuzz)."""

from __future__ import annotations

import json

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from broker import protocol as p
from broker.errors import FrameError


def parse(obj: object) -> p.Command:
    return p.parse_command(json.dumps(obj))


def test_each_op_parses() -> None:
    assert parse({"op": "ping", "id": 1}) == p.Ping(1)
    assert parse({"op": "auth", "token": "t"}) == p.Auth(None, "t")
    assert parse({"op": "subscribe", "topic": "a", "id": "x"}) == p.Subscribe("x", "a")
    assert parse(
        {"op": "subscribe", "topic": "a", "since": {"offset": 3, "epoch": "e"}, "presence": True}
    ) == p.Subscribe(None, "a", p.Since(3, "e"), True)
    assert parse({"op": "unsubscribe", "topic": "a"}) == p.Unsubscribe(None, "a")
    assert parse({"op": "publish", "topic": "a", "data": {"k": [1, "é"]}}) == p.Publish(
        None, "a", '{"k":[1,"é"]}'
    )
    assert parse({"op": "publish", "topic": "a", "data": None}).data == "null"  # type: ignore[union-attr]
    assert parse({"op": "history", "topic": "a", "limit": 5}) == p.History(None, "a", None, 5)
    assert parse({"op": "history", "topic": "a", "last": 5}) == p.History(None, "a", None, 5, True)
    assert parse(
        {"op": "history", "topic": "a", "since": {"offset": 3, "epoch": "e"}, "last": 1000}
    ) == p.History(None, "a", p.Since(3, "e"), 1000, True)
    assert parse({"op": "presence", "topic": "a", "id": 2}) == p.Presence(2, "a")


@pytest.mark.parametrize(
    ("frame", "fid", "fragment"),
    [
        ("not json", None, "not valid JSON"),
        ("[1,2]", None, "object"),
        ('{"id":1}', 1, "missing field 'op'"),
        ('{"op":"nope","id":2}', 2, "unknown op"),
        ('{"op":"publish","topic":"a","id":3}', 3, "missing field 'data'"),
        ('{"op":"publish","topic":5,"data":1,"id":4}', 4, "wrong type"),
        ('{"op":"subscribe","id":5}', 5, "missing field 'topic'"),
        ('{"op":"subscribe","topic":"a","presence":"yes","id":6}', 6, "presence"),
        (
            '{"op":"subscribe","topic":"a","since":{"offset":-1,"epoch":"e"},"id":7}',
            7,
            "since.offset",
        ),
        ('{"op":"subscribe","topic":"a","since":5,"id":8}', 8, "since"),
        ('{"op":"history","topic":"a","limit":0,"id":9}', 9, "limit"),
        ('{"op":"history","topic":"a","limit":true,"id":10}', 10, "limit"),
        ('{"op":"history","topic":"a","last":0,"id":12}', 12, "'last' must be 1 to 1000"),
        ('{"op":"history","topic":"a","last":-3,"id":13}', 13, "'last' must be 1 to 1000"),
        ('{"op":"history","topic":"a","last":1001,"id":14}', 14, "'last' must be 1 to 1000"),
        ('{"op":"history","topic":"a","last":2.5,"id":15}', 15, "'last' must be an integer"),
        ('{"op":"history","topic":"a","last":"5","id":16}', 16, "'last' must be an integer"),
        ('{"op":"history","topic":"a","last":true,"id":17}', 17, "'last' must be an integer"),
        ('{"op":"history","topic":"a","last":null,"id":18}', 18, "'last' must be an integer"),
        ('{"op":"history","topic":"a","last":2,"limit":2,"id":19}', 19, "exclude each other"),
        ('{"op":"ping","id":true}', None, "'id'"),
        ('{"op":"ping","id":1.5}', None, "'id'"),
        ('{"op":"ping","id":"' + "x" * 65 + '"}', None, "64"),
        ('{"op":"auth","token":null,"id":11}', 11, "wrong type"),
    ],
)
def test_bad_frames_say_what_is_wrong(frame: str, fid: object, fragment: str) -> None:
    with pytest.raises(FrameError) as info:
        p.parse_command(frame)
    assert info.value.code == "bad_request"
    assert info.value.frame_id == fid
    assert fragment in info.value.message


def test_binary_frames_are_refused() -> None:
    with pytest.raises(FrameError, match="binary"):
        p.parse_command(b'{"op":"ping"}')


def test_deep_nesting_is_a_bad_request_not_a_crash() -> None:
    with pytest.raises(FrameError):
        p.parse_command("[" * 100000 + "]" * 100000)


def test_message_encoding_is_valid_json_and_framed_once() -> None:
    text = p.encode_message("chat.x", 7, "ep", "alice", '{"a":1}')
    assert json.loads(text) == {
        "op": "message",
        "topic": "chat.x",
        "offset": 7,
        "epoch": "ep",
        "from": "alice",
        "data": {"a": 1},
    }
    assert p.message_dict("chat.x", 7, "ep", "alice", '{"a":1}') == json.loads(text)


@pytest.mark.parametrize("size", [0, 125, 126, 65535, 65536, 70000])
def test_frame_header_lengths(size: int) -> None:
    payload = b"x" * size
    frame = p.frame_text(payload)
    assert frame[0] == 0x81
    assert frame.endswith(payload)
    header = len(frame) - size
    assert header == (2 if size < 126 else 4 if size < 65536 else 10)


def test_history_reply_splices_the_pushes_as_they_are() -> None:
    push = p.encode_message("chat.x", 7, "ep", "alice", '{"a":[1,2],"é":null}')
    text = p.encode_history_reply(3, [push, push], offset=9, epoch="ep", recovered=True)
    assert json.loads(text) == {
        "id": 3,
        "ok": True,
        "offset": 9,
        "epoch": "ep",
        "recovered": True,
        "messages": [json.loads(push)] * 2,
    }
    assert text.endswith(f',"messages":[{push},{push}]}}')
    assert json.loads(p.encode_history_reply("h", [], offset=0, epoch="e"))["messages"] == []


@pytest.mark.parametrize(
    ("frame", "fid"),
    [
        ('{"op":"ping","id":"\\ud800"}', None),  # the id itself cannot be echoed back
        ('{"op":"auth","token":"\\udfff","id":"a"}', "a"),
        ('{"op":"publish","topic":"t","data":"x\\ud800y","id":7}', 7),
        ('{"op":"publish","topic":"t","data":{"\\udc00":1},"id":7}', 7),  # a key
        ('{"op":"publish","topic":"t","data":[[["\\ud83d"]]],"id":7}', 7),  # deep, half a pair
        ('{"op":"subscribe","topic":"a\\ud800","id":1}', 1),
        ('{"op":"history","topic":"a","since":{"offset":1,"epoch":"\\ud800"},"id":1}', 1),
        ('{"op":"ping","\\ud800":1,"id":1}', 1),
    ],
)
def test_a_lone_surrogate_anywhere_is_a_bad_request(frame: str, fid: object) -> None:
    with pytest.raises(FrameError) as info:
        p.parse_command(frame)
    assert info.value.code == "bad_request"
    assert "surrogate" in info.value.message
    assert info.value.frame_id == fid
    # The error reply itself can be sent.
    p.encode_error(info.value.frame_id, info.value.code, info.value.message).encode()


def test_surrogate_pairs_are_characters_not_errors() -> None:
    cmd = p.parse_command('{"op":"publish","topic":"t","data":"\\ud83d\\ude00","id":"\\u00e9"}')
    assert cmd == p.Publish("é", "t", '"😀"')


def test_publish_data_with_a_lone_surrogate_is_refused_by_the_size_check() -> None:
    # The HTTP publish path builds the data text itself and relies on this check.
    with pytest.raises(FrameError) as info:
        p.check_data_size('"\ud800"', 100)
    assert info.value.code == "bad_request"


@pytest.mark.parametrize("fid", [0, -7, 2**63 - 1, "", "x", 'quote " and \\ and \n', "é😀"])
def test_the_publish_reply_is_encode_reply_to_the_byte(fid: int | str) -> None:
    assert p.encode_published(fid, 12, "ab12") == p.encode_reply(fid, offset=12, epoch="ab12")


@pytest.mark.parametrize(
    ("frame", "expected"),
    [
        (' {"op":"ping","id":1}', p.Ping(1)),
        ('{"op":"ping","id":2} \r\n\t', p.Ping(2)),
        ('\n{"op":"publish","topic":"a","data":"é"}\n', p.Publish(None, "a", '"é"')),
        ('{"op":"ping","id":3} {}', None),
        ('{"op":"ping","id":4}\x0c', None),  # not JSON whitespace
        ('\ufeff{"op":"ping","id":5}', None),
        ("", None),
        ("  ", None),
    ],
)
def test_whitespace_and_trailing_text_are_judged_as_json_loads_does(
    frame: str, expected: p.Command | None
) -> None:
    if expected is not None:
        assert p.parse_command(frame) == expected
        return
    with pytest.raises(FrameError, match="not valid JSON"):
        p.parse_command(frame)


# JSON values as clients send them (strings of any characters, nesting, numbers of every form).
_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
    max_leaves=8,
)


@st.composite
def _publish_texts(draw: st.DrawFn) -> str:
    """Publication frames as the SDKs write them (keys in order, compact, an integer id last),
    and near misses: other spacing and escaping, ids of other kinds and forms, text after."""
    compact = draw(st.booleans())
    ascii_only = draw(st.booleans())

    def text_of(value: object) -> str:
        if not compact:
            return json.dumps(value, ensure_ascii=ascii_only)
        return json.dumps(value, separators=(",", ":"), ensure_ascii=ascii_only)

    topic = text_of(draw(st.text() | st.sampled_from(["a", "bench.many.7", "é.x", ""])))
    data = text_of(draw(_json_values)) if draw(st.booleans()) else draw(st.text(max_size=12))
    frame = '{"op":"publish","topic":' + topic + ',"data":' + data
    kind = draw(st.sampled_from(["none", "int", "text", "other"]))
    if kind == "int":
        frame += ',"id":' + str(draw(st.integers(min_value=-(2**64), max_value=2**64)))
    elif kind == "text":
        frame += ',"id":' + draw(st.sampled_from(["-0", "007", "0", "-", "1e3", "1.0", "²", ""]))
    elif kind == "other":
        frame += ',"id":' + text_of(draw(_json_values))
    return frame + draw(st.sampled_from(["}", "}", " }", "} ", "}}", ',"x":1}', ""]))


@given(_publish_texts())
@example('{"op":"publish","topic":"a","data":{"k": [1, 2.50]},"id":-0}')
@example('{"op":"publish","topic":"a","data":"\\ud800"}')
@example('{"op":"publish","topic":"a\tb","data":1}')
@example('{"op":"publish","topic":"a","data":NaN,"id":007}')
def test_the_usual_publication_reads_as_the_general_path_does(text: str) -> None:
    # The frame read without the scanner's dict gives what the general path gives; whatever it
    # declines the general path answers (its command, or its error).
    usual = p._usual_publish(text)
    try:
        general: object = p._parse_frame(text)
    except FrameError as exc:
        general = exc
    if usual is not None:
        assert usual == general


@given(
    topic=st.text(),
    data=_json_values,
    fid=st.none() | st.integers(min_value=-(10**18) + 1, max_value=10**18 - 1),
)
def test_every_sdk_publication_without_an_escape_takes_the_usual_path(
    topic: str, data: object, fid: int | None
) -> None:
    frame = {"op": "publish", "topic": topic, "data": data}
    if fid is not None:
        frame["id"] = fid
    try:
        text = json.dumps(frame, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except ValueError:
        return  # NaN: no SDK sends it
    usual = p._usual_publish(text)
    if "\\" in text or not topic.isprintable():
        assert usual is None
    else:
        assert usual is not None and usual == p._parse_frame(text)


@pytest.mark.parametrize(
    "text",
    [
        '{"op":"publish","topic":"a.b","data":"x"}',
        '{"op":"publish","topic":"a.b","data":{"k":[1,"é"]},"id":17}',
        '{"op":"publish","topic":"é","data":null,"id":-0}',
        '{"op":"publish","topic":"a","data":"x","id":999999999999999999}',
    ],
)
def test_the_sdks_publications_take_the_usual_path(text: str) -> None:
    usual = p._usual_publish(text)
    assert usual is not None and usual == p._parse_frame(text)
