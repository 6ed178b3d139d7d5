#!/usr/bin/env python3
"""Long fuzz campaign for the NNR unit reader (the CI test ``tests/test_bitstream_fuzz.py`` runs the
same properties for about half a minute).

Property checked on every input: ``read_units`` either raises ``BitstreamError`` / ``LimitError`` /
``UnsupportedError`` with a message naming unit and field, or returns units that re-serialise to
the input bytes. Anything else (another exception type, a hang the time limit catches, a memory
blow-up) is a bug; the failing input is written to ``--out``.

Engines:
* ``hypothesis`` (default): mutated valid streams, random unit bodies and random bytes, in rounds
  until ``--minutes`` are used up (each round is a fresh random seed).
* ``atheris`` (coverage-guided libFuzzer; ``pip install atheris``): seeded with valid streams;
  extra arguments after ``--`` go to libFuzzer (e.g. ``-- -max_len=4096 -rss_limit_mb=1024``).

Examples::

    python tools/fuzz_campaign.py --minutes 30
    python tools/fuzz_campaign.py --engine atheris --minutes 60 -- -max_len=2048
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _seed_corpus(n: int) -> list[bytes]:
    """Valid streams: the worked example plus hypothesis-generated ones (any NNR unit type)."""
    from hypothesis import HealthCheck, given, settings
    from nncjax.kernels.units import write_stream

    from tests.test_units import EXAMPLE, streams

    out = [EXAMPLE]

    @settings(max_examples=n, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(streams())
    def collect(units):
        out.append(write_stream(units))

    collect()
    return out


def _save_failure(out_dir: Path, data: bytes, exc: BaseException) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"crash-{int(time.time() * 1000)}.nnr"
    path.write_bytes(data)
    path.with_suffix(".txt").write_text(f"{type(exc).__name__}: {exc}\n")
    return path


def run_hypothesis(minutes: float, out_dir: Path, examples_per_round: int) -> int:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from tests.test_bitstream_fuzz import EXAMPLE, check, mutated

    deadline = time.monotonic() + 60 * minutes
    total = rounds = 0
    cfg = settings(max_examples=examples_per_round, deadline=None, database=None, derandomize=False,
                   suppress_health_check=list(HealthCheck))

    def guarded(data: bytes) -> None:
        try:
            check(data)
        except BaseException as e:
            print(f"FAILURE saved to {_save_failure(out_dir, data, e)}", file=sys.stderr)
            raise

    bodies = st.tuples(st.sampled_from([1, 2, 3, 5]), st.binary(max_size=120)).map(
        lambda t: EXAMPLE[:18] + (len(t[1]) + 3).to_bytes(2, "big") + bytes([t[0] << 2 | 2]) + t[1])
    strategies = [mutated(), bodies, st.binary(max_size=400)]
    while time.monotonic() < deadline:
        for strat in strategies:
            cfg(given(strat)(guarded))()
            total += examples_per_round
        rounds += 1
        print(f"round {rounds}: {total} inputs, no failure", flush=True)
    return 0


def run_atheris(minutes: float, out_dir: Path, libfuzzer_args: list[str]) -> int:
    import atheris

    with atheris.instrument_imports():
        from nncjax.kernels import bits, ndu, perfmaps, units  # noqa: F401
    from tests.test_bitstream_fuzz import check

    corpus = out_dir / "corpus"
    corpus.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i, seed in enumerate(_seed_corpus(200)):
            (corpus / f"seed-{i}.nnr").write_bytes(seed)

    def one_input(data: bytes) -> None:
        check(bytes(data))

    argv = [sys.argv[0], str(corpus), f"-max_total_time={int(60 * minutes)}",
            f"-artifact_prefix={out_dir}{os.sep}", *libfuzzer_args]
    atheris.Setup(argv, one_input)
    atheris.Fuzz()
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=10.0, help="campaign length (default 10)")
    p.add_argument("--engine", choices=["hypothesis", "atheris"], default="hypothesis")
    p.add_argument("--out", type=Path, default=ROOT / "fuzz-artifacts", help="where failing inputs go")
    p.add_argument("--examples-per-round", type=int, default=2000)
    args, rest = p.parse_known_args()
    rest = [a for a in rest if a != "--"]
    if args.engine == "atheris":
        try:
            return run_atheris(args.minutes, args.out, rest)
        except ImportError:
            print("atheris is not installed: pip install atheris", file=sys.stderr)
            return 2
    return run_hypothesis(args.minutes, args.out, args.examples_per_round)


if __name__ == "__main__":
    sys.exit(main())
