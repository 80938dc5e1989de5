"""The frame layer (:mod:`broker.frames`) as plain functions of bytes: what a client's frames
give, every way a client can break RFC 6455 and the code it is closed with, and the frames the
server builds."""

from __future__ import annotations

import struct
import tracemalloc

import pytest
from hypothesis import given
from hypothesis import strategies as st

from broker import frames
from broker.errors import WebSocketViolation
from broker.frames import (
    HEADER_ALLOWANCE,
    MAX_FRAGMENTS,
    NO_STATUS,
    Close,
    FrameReader,
    Ping,
    close_frame,
    encode_frame,
)
from tests.support.rawws import encode_frame as client_frame

LIMIT = 1000


def read_all(stream: bytes, *, step: int = 0, limit: int = LIMIT) -> list[object]:
    """Everything ``stream`` holds, fed whole or in pieces of ``step`` bytes."""
    reader = FrameReader(limit)
    events: list[object] = []
    pieces = [stream] if not step else [stream[i : i + step] for i in range(0, len(stream), step)]
    for piece in pieces:
        reader.feed(piece)
        while (event := reader.next()) is not None:
            events.append(event)
    return events


def refusal(stream: bytes, *, limit: int = LIMIT) -> tuple[int, str]:
    with pytest.raises(WebSocketViolation) as refused:
        read_all(stream, limit=limit)
    return refused.value.code, refused.value.reason


def test_messages_fragments_and_control_frames_in_order_at_every_split() -> None:
    stream = (
        client_frame("héllo".encode())
        + client_frame(b"\x00\xff", opcode=0x2)
        + client_frame(b"fr", fin=False)
        + client_frame(b"are", opcode=0xA)  # a pong between fragments: consumed silently
        + client_frame(b"ag", opcode=0x0, fin=False)
        + client_frame(b"p1", opcode=0x9)
        + client_frame("ment ✓".encode(), opcode=0x0)
        + client_frame(b"x" * 300)  # a 16-bit length
        + client_frame(b"", opcode=0x2)
        + client_frame(struct.pack("!H", 4000) + b"bye", opcode=0x8)
    )
    expected = [
        "héllo",
        b"\x00\xff",
        Ping(b"p1"),
        "fragment ✓",
        "x" * 300,
        b"",
        Close(4000, "bye"),
    ]
    for step in (0, 1, 2, 3, 5, 64):
        assert read_all(stream, step=step) == expected


def test_a_message_at_the_limit_passes_and_one_byte_more_is_refused_from_its_header() -> None:
    assert read_all(client_frame(b"y" * LIMIT)) == ["y" * LIMIT]
    # only the header: the payload is never waited for
    assert refusal(client_frame(b"y" * (LIMIT + 1))[:4]) == (1009, "message too large")
    assert refusal(client_frame(b"", length=2**62)[:10])[0] == 1009
    # fragments count together
    parts = client_frame(b"a" * 600, fin=False) + client_frame(b"b" * 401, opcode=0x0)
    assert refusal(parts)[0] == 1009


@pytest.mark.parametrize(
    ("stream", "code", "says"),
    [
        (bytes([0xC1]) + client_frame(b"hi")[1:], 1002, "reserved bits"),
        (client_frame(b"hi", masked=False), 1002, "masked"),
        (client_frame(b"hi", opcode=0x3), 1002, "opcode 0x3"),
        (client_frame(b"hi", opcode=0xB), 1002, "opcode 0xb"),
        (client_frame(b"hi", opcode=0x9, fin=False), 1002, "fragmented"),
        (client_frame(b"p" * 126, opcode=0x9), 1002, "125"),
        (client_frame(b"hi", opcode=0x0), 1002, "continuation"),
        (client_frame(b"a", fin=False) + client_frame(b"b"), 1002, "before the fragmented"),
        (client_frame(b"\xc3\x28"), 1007, "UTF-8"),
        (client_frame(b"\xc3", fin=False) + client_frame(b"\xff", opcode=0x0), 1007, "UTF-8"),
        (client_frame(b"\x03", opcode=0x8), 1002, "one-byte"),
        (client_frame(struct.pack("!H", 1005), opcode=0x8), 1002, "1005"),
        (client_frame(struct.pack("!H", 999), opcode=0x8), 1002, "999"),
        (client_frame(struct.pack("!H", 2000), opcode=0x8), 1002, "2000"),
        (client_frame(struct.pack("!H", 5000), opcode=0x8), 1002, "5000"),
        (client_frame(struct.pack("!H", 1000) + b"\xff", opcode=0x8), 1007, "UTF-8"),
    ],
)
def test_each_protocol_violation_is_refused_with_its_code(
    stream: bytes, code: int, says: str
) -> None:
    refused_code, reason = refusal(stream)
    assert refused_code == code
    assert says in reason


def test_a_close_frame_without_a_code_reads_as_1005() -> None:
    assert read_all(client_frame(b"", opcode=0x8)) == [Close(NO_STATUS, "")]
    assert read_all(client_frame(struct.pack("!H", 1014), opcode=0x8)) == [Close(1014, "")]


def test_the_buffer_is_let_go_once_everything_is_read() -> None:
    reader = FrameReader(100_000)
    reader.feed(client_frame(b"z" * 90_000))
    assert reader.next() == "z" * 90_000
    assert reader.next() is None
    assert len(reader._buf) == 0 and reader._pos == 0


@given(
    payload=st.binary(max_size=300),
    split=st.integers(min_value=1, max_value=400),
)
def test_unmasking_matches_the_definition(payload: bytes, split: int) -> None:
    # rawws masks with a fresh random key, byte by byte as RFC 6455 5.3 defines it
    assert read_all(client_frame(payload, opcode=0x2), step=split) == [payload]


@given(payload=st.binary(max_size=300), mask=st.binary(min_size=4, max_size=4))
def test_both_ways_of_unmasking_match_the_definition(payload: bytes, mask: bytes) -> None:
    # RFC 6455 5.3, byte by byte: the C routine (when built) and the pure-Python fallback
    expected = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    assert frames._xor_unmask(bytearray(payload), bytearray(mask)) == expected
    assert frames._unmask(bytearray(payload), bytearray(mask)) == expected


@pytest.mark.parametrize("size", [0, 125, 126, 65535, 65536])
def test_server_frames_are_final_unmasked_and_sized(size: int) -> None:
    frame = encode_frame(0x2, b"x" * size)
    assert frame[0] == 0x82 and not frame[1] & 0x80
    assert len(frame) - size == (2 if size < 126 else 4 if size < 65536 else 10)


def test_close_frames_cut_long_reasons_on_a_character_boundary() -> None:
    frame = close_frame(1008, "é" * 100)  # 200 bytes of UTF-8
    assert frame[:2] == bytes([0x88, 125 - 1])  # 2 + 122: the 123rd byte was half a character
    assert frame[2:4] == struct.pack("!H", 1008)
    assert frame[4:].decode("utf-8") == "é" * 61
    assert close_frame(NO_STATUS, "") == b"\x88\x00"


def fragmented(pieces: list[bytes], opcode: int = 0x1) -> bytes:
    """One message in ``len(pieces)`` frames: the first with ``opcode``, the last final."""
    last = len(pieces) - 1
    return b"".join(
        client_frame(piece, 0x0 if i else opcode, fin=i == last) for i, piece in enumerate(pieces)
    )


def split(data: bytes, k: int) -> list[bytes]:
    """``data`` in ``k`` pieces of nearly equal length (some empty when k > len(data))."""
    n = len(data)
    return [data[i * n // k : (i + 1) * n // k] for i in range(k)]


def test_a_message_may_come_in_max_fragments_frames_and_not_one_more() -> None:
    limit = 4096  # room for the headers of 1025 empty frames: only the count can refuse them
    assert read_all(fragmented([b""] * MAX_FRAGMENTS), limit=limit) == [""]
    with pytest.raises(WebSocketViolation) as refused:
        read_all(fragmented([b""] * (MAX_FRAGMENTS + 1)), limit=limit)
    assert (refused.value.code, refused.value.reason) == (1009, "too many fragments")
    assert refused.value.kind == "fragments"
    # refused from the header of the frame one too many, before any final frame comes
    opening = client_frame(b"", fin=False) + client_frame(b"", 0x0, fin=False) * MAX_FRAGMENTS
    assert refusal(opening[:-4], limit=limit) == (1009, "too many fragments")


def test_frame_headers_count_against_the_limit_with_a_fixed_allowance() -> None:
    # 683 frames with 6-byte headers (4098 bytes of them): at the limit with 998 bytes of
    # payload, one byte over with 999, though the payload alone is under LIMIT.
    assert HEADER_ALLOWANCE + 2 == 683 * 6
    payload = b"p" * (LIMIT - 2)
    assert read_all(fragmented(split(payload, 683), opcode=0x2)) == [payload]
    code, reason = refusal(fragmented(split(payload + b"p", 683)))
    assert code == 1009 and "frame headers" in reason


def test_one_byte_fragments_take_the_message_size_not_a_piece_each() -> None:
    # A list of 1-byte pieces held ~42 bytes per fragment; the message's one buffer holds 1.
    n = MAX_FRAGMENTS - 1
    reader = FrameReader(100_000)
    stream = client_frame(b"a", fin=False) + b"".join(
        client_frame(b"b", 0x0, fin=False) for _ in range(n - 1)
    )
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(0, len(stream), 1024):
            reader.feed(stream[i : i + 1024])
            assert reader.next() is None
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert held < 4 * n, held  # the message (n bytes), and at most one piece of input
    reader.feed(client_frame(b"c", 0x0))
    assert reader.next() == "a" + "b" * (n - 1) + "c"


def test_in_message_says_whether_part_of_a_message_is_held() -> None:
    reader = FrameReader(LIMIT)
    assert not reader.in_message
    whole = client_frame(b"hello")
    reader.feed(whole[:3])  # a frame's first bytes
    assert reader.next() is None and reader.in_message
    reader.feed(whole[3:])
    assert reader.next() == "hello" and reader.next() is None and not reader.in_message
    reader.feed(client_frame(b"he", fin=False) + client_frame(b"", 0x9))
    assert reader.next() == Ping(b"")  # a ping inside the message
    assert reader.next() is None and reader.in_message  # the message is still open
    reader.feed(client_frame(b"llo", 0x0))
    assert reader.next() == "hello" and reader.next() is None and not reader.in_message


@pytest.mark.parametrize("code", [1000, 1001, 1002, 1003, 1007, 1014, 3000, 4999])
def test_every_sendable_close_code_is_read(code: int) -> None:
    assert read_all(client_frame(struct.pack("!H", code), opcode=0x8)) == [Close(code, "")]


@pytest.mark.parametrize("code", [1004, 1006, 1015, 2999, 5000])
def test_a_reserved_close_code_is_refused(code: int) -> None:
    assert refusal(client_frame(struct.pack("!H", code), opcode=0x8)) == (
        1002,
        f"close code {code} may not be sent",
    )


def test_lengths_at_the_header_boundaries_are_read() -> None:
    sizes = [125, 126, 65535, 65536, 70_000]
    stream = b"".join(client_frame(b"z" * size, opcode=0x2) for size in sizes)
    stream += client_frame(b"p" * 125, opcode=0x9)  # a control frame at its limit
    for step in (0, 7, 4096):
        events = read_all(stream, step=step, limit=70_000)
        assert [len(e) for e in events[:-1]] == sizes  # type: ignore[arg-type]
        assert events[-1] == Ping(b"p" * 125)


def test_a_close_reason_that_fits_is_kept_whole() -> None:
    reason = "r" * 123
    frame = close_frame(4000, reason)
    assert frame[:2] == bytes([0x88, 125]) and frame[4:] == reason.encode()
    assert close_frame(1005, "ignored") == bytes([0x88, 0])
