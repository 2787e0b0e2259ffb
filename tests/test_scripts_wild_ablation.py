"""The results scripts' judged subsample (`--eval-sample`, `crispedit.data.readers.evenly_spaced`): deterministic,
spread over the whole batch."""

import importlib.util
import subprocess
import sys
from pathlib import Path

from crispedit.data.readers import evenly_spaced

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "wild_ablation.py"


def _script():
    spec = importlib.util.spec_from_file_location("wild_ablation", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_evenly_spaced_covers_the_batch_from_first_to_last_part():
    pick = evenly_spaced
    reqs = list(range(500))
    got = pick(reqs, 100)
    assert len(got) == 100 and len(set(got)) == 100
    assert got[0] == 0 and got[-1] >= 495  # the last facts of the batch are judged, not only the first
    assert all(b - a == 5 for a, b in zip(got, got[1:]))
    assert pick(reqs, 100) == got  # deterministic


def test_evenly_spaced_keeps_everything_when_not_asked_or_not_smaller():
    pick = evenly_spaced
    reqs = list(range(7))
    assert pick(reqs, None) == reqs
    assert pick(reqs, 7) == reqs
    assert pick(reqs, 50) == reqs
    assert sorted(set(pick(reqs, 3))) == pick(reqs, 3) and len(pick(reqs, 3)) == 3


def test_scripts_refuse_an_empty_sample_before_loading_anything(tmp_path):
    """`--eval-sample 0` is a one-line error at once (no model, cache or data is read: the paths do not exist)."""
    common = ["--cache", str(tmp_path / "no-cache"), "--out", str(tmp_path / "out.jsonl"), "--eval-sample", "0"]
    for name, extra in (("wild_ablation.py", ["--runs", str(tmp_path / "no-runs.json"), "--data", "cf=nowhere:5"]),
                        ("kl_budget_curve.py", ["--data", "cf=nowhere:5"])):
        res = subprocess.run([sys.executable, str(SCRIPT.parent / name), *common, *extra],
                             capture_output=True, text=True, timeout=120)
        assert res.returncode != 0, name
        assert "--eval-sample: must be at least 1, got 0" in res.stderr, (name, res.stderr[-500:])
        assert "Traceback" not in res.stderr, name


def test_chunk_reliability_under_a_sample_groups_judged_rows_by_their_chunk():
    """Per-chunk reliability with `--eval-sample`: each judged row counts for the chunk its request was edited in."""
    mod = _script()
    n, k = 10, 4  # chunks of 5; judged indices 0, 2, 5, 7
    judged_index = evenly_spaced(range(n), k)
    assert judged_index == [0, 2, 5, 7]
    hit = {0: 1.0, 2: 0.0, 5: 1.0, 7: 1.0}
    rows = [{"reliability": {"generated": {"qa": {"exact_match": hit[j]}, "chat": {"contains_match": hit[j]}}}}
            for j in judged_index]
    out = mod.chunk_reliability(rows, [{"n_edits": 5}, {"n_edits": 5}], judged_index)
    assert [c["n_judged"] for c in out] == [2, 2]
    assert [c["reliability_gen_qa"] for c in out] == [0.5, 1.0]
    assert [c["reliability_gen_chat_contains"] for c in out] == [0.5, 1.0]
    assert all("reliability_gen_raw" not in c for c in out)


def test_resuming_a_state_with_other_edit_settings_is_refused():
    """A resumed sequential state edits with its own settings; a run whose settings changed meanwhile is refused
    with the field named, and an unchanged run passes."""
    import json

    import pytest

    from crispedit.editing.config import EditConfig

    mod = _script()
    cfg = EditConfig()
    state = json.loads(json.dumps({"config": cfg.to_json(), "edit_weight": 1, "edit_statistics": "sequence",
                                   "edit_gamma": None}))  # as read back from state.json
    mod.check_resumed_settings(Path("S"), state, cfg, 1, "sequence", None)
    with pytest.raises(SystemExit, match=r"S: .*\blr\b"):
        mod.check_resumed_settings(Path("S"), state, cfg.replace(lr=cfg.lr * 2), 1, "sequence", None)
    with pytest.raises(SystemExit, match="edit_weight 1, the run says 10"):
        mod.check_resumed_settings(Path("S"), state, cfg, 10, "sequence", None)
    with pytest.raises(SystemExit, match="edit_gamma None, the run says 0.9"):
        mod.check_resumed_settings(Path("S"), state, cfg, 1, "sequence", 0.9)
