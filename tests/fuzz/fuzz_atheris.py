"""Coverage-guided fuzzing of the broker's input-facing layers with atheris (libFuzzer).

    python -m tests.fuzz.fuzz_atheris [libFuzzer options, e.g. -runs=100000 CORPUS_DIR]

``make test`` runs it for a bounded number of inputs (``test_fuzz.py``); run it longer by hand
to search deeper. A finding stops it with the failing input written to ``crash-*``.
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports(include=["broker"]):
    from tests.fuzz.targets import check


def main() -> None:
    atheris.Setup(sys.argv, check)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
