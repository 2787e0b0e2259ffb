"""The results script's judged subsample (`--eval-sample`): deterministic, spread over the whole batch."""

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "wild_ablation.py"


def _script():
    spec = importlib.util.spec_from_file_location("wild_ablation", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_evenly_spaced_covers_the_batch_from_first_to_last_part():
    pick = _script().evenly_spaced
    reqs = list(range(500))
    got = pick(reqs, 100)
    assert len(got) == 100 and len(set(got)) == 100
    assert got[0] == 0 and got[-1] >= 495  # the last facts of the batch are judged, not only the first
    assert all(b - a == 5 for a, b in zip(got, got[1:]))
    assert pick(reqs, 100) == got  # deterministic


def test_evenly_spaced_keeps_everything_when_not_asked_or_not_smaller():
    pick = _script().evenly_spaced
    reqs = list(range(7))
    assert pick(reqs, None) == reqs
    assert pick(reqs, 7) == reqs
    assert pick(reqs, 50) == reqs
    assert sorted(set(pick(reqs, 3))) == pick(reqs, 3) and len(pick(reqs, 3)) == 3
