"""Reliability case 12: arbitrary bytes and JSON against the broker's input-facing layers
(see ``targets.py`` for what each must hold), by Hypothesis and by atheris.

The live half of the case, malformed frames over real sockets against a running broker that
must answer and survive, is in ``tests/integration/test_attacks.py``.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.fuzz.targets import SEEDS, TARGETS, check, command

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]

# Some text holds lone surrogates: JSON can carry them (as escapes), UTF-8 frames cannot.
odd_text = st.text(st.characters(categories=["Cs", "Ll"]), max_size=4)
scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20) | odd_text
json_values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8) | odd_text, inner)
    ),
    max_leaves=12,
)
# Mostly scalars, mostly of the types fields expect, so that each check is passed as often
# as it is failed and the checks after it are reached too.
field_values = st.text(max_size=12) | st.integers() | scalars | json_values
# The fields each op reads; any other field is ignored by the parser.
FIELDS_OF = {
    "auth": ["token"],
    "subscribe": ["topic", "since", "presence"],
    "unsubscribe": ["topic"],
    "publish": ["topic", "data"],
    "history": ["topic", "since", "limit"],
    "presence": ["topic"],
    "ping": [],
}
since_values = field_values | st.dictionaries(st.sampled_from(["offset", "epoch"]), field_values)


@st.composite
def frames(draw: st.DrawFn) -> bytes:
    """Client frames: usually a real op with its own fields, each of any type, so every
    field check of every op is reached (random JSON alone rarely names an op)."""
    op = draw(st.sampled_from(list(FIELDS_OF)) | field_values)
    frame: dict[str, object] = {"op": op}
    if draw(st.booleans()):
        frame["id"] = draw(field_values)
    names = FIELDS_OF.get(op, ["topic", "data"]) if isinstance(op, str) else ["topic"]
    for name in names:
        if draw(st.integers(0, 4)):  # usually present
            frame[name] = draw(since_values if name == "since" else field_values)
    return json.dumps(frame).encode()


@settings(max_examples=300)
@given(
    st.integers(0, len(TARGETS) - 1),
    st.binary(max_size=400)
    | json_values.map(lambda v: json.dumps(v).encode())
    | st.sampled_from(SEEDS).map(lambda s: s[1:]),
)
def test_any_input_to_any_target(target: int, data: bytes) -> None:
    check(bytes([target]) + data)


@settings(max_examples=500)
@given(frames())
def test_any_client_frame(frame: bytes) -> None:
    check(bytes([TARGETS.index(command)]) + frame)


def test_every_seed_is_well_formed_for_its_target() -> None:
    for seed in SEEDS:
        check(seed)


@pytest.mark.skipif(
    importlib.util.find_spec("atheris") is None,
    reason="atheris has no wheel for this platform (it is installed on x86-64 Linux)",
)
def test_atheris_finds_nothing(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for n, seed in enumerate(SEEDS):
        (corpus / f"seed-{n}").write_bytes(seed)
    # bounded by count and time; a finding exits non-zero and names the crashing input
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "tests.fuzz.fuzz_atheris",
            "-runs=300000",
            "-max_total_time=45",
            f"-artifact_prefix={tmp_path}/",
            f"-dict={HERE / 'protocol.dict'}",
            str(corpus),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    report = result.stderr
    assert result.returncode == 0, report[report.find("=== Uncaught") :][:4000] or report[-4000:]
    assert "Done" in result.stderr
