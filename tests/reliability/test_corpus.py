"""The reliability corpus (issue 15): every bad input ends in one clear message with the right exit code, no
traceback, nothing half-written, nothing silently accepted. Totals are printed at the end of the module."""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.reliability.cases import cases
from tests.reliability.harness import half_written, run_inprocess

CASES = cases()


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """(size, mtime) of every file under root but logs and locks, which any command may write."""
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")
            if p.is_file() and p.suffix != ".log" and p.name != ".lock" and ".hydra" not in p.parts}
TOTALS = {"cases": 0, "clear errors": 0, "expected successes": 0, "tracebacks": 0, "silent": 0, "half-written": 0}


@pytest.fixture(scope="module", autouse=True)
def totals():
    yield
    print("\nreliability corpus totals: " + ", ".join(f"{k} {v}" for k, v in TOTALS.items()))


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_case(case, tmp_path, request):
    art = request.getfixturevalue("artifacts") if case.needs_run else {}
    if case.setup is not None:
        case.setup(tmp_path, art)
    before = set(half_written(tmp_path))
    files = snapshot(tmp_path)
    out = run_inprocess(case.argv(tmp_path, art))
    TOTALS["cases"] += 1
    TOTALS["tracebacks"] += out.traceback
    TOTALS["silent"] += case.code != 0 and out.code == 0
    new_damage = sorted(set(half_written(tmp_path)) - before)
    TOTALS["half-written"] += bool(new_damage)
    assert not out.traceback, out.text[-3000:]
    assert out.code == case.code, f"exit {out.code}, expected {case.code}:\n{out.text[-3000:]}"
    for word in case.words:
        assert word in out.text, f"{word!r} not in the message:\n{out.text[-3000:]}"
    assert not new_damage, new_damage
    if case.code:  # a refused command changes no file that was there (nothing overwritten or dropped)
        now = snapshot(tmp_path)
        changed = [p for p, sig in files.items() if now.get(p) != sig]
        TOTALS["silent"] += bool(changed)
        assert not changed, f"a refused command changed or removed {changed}"
    if case.check is not None:
        case.check(tmp_path, art, out)
    TOTALS["clear errors" if case.code else "expected successes"] += 1
