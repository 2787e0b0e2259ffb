"""Edit request readers: real benchmark files map onto EditRequest field by field; bad files fail clearly."""

from __future__ import annotations

import json
import os
import re
import warnings
from pathlib import Path

import pytest

from crispedit.data.readers import (
    FORMATS,
    detect_format,
    load_requests,
    nq_question,
    requests_fingerprint,
    save_requests,
)
from crispedit.data.records import EditRequest, LocalityPrompt
from crispedit.errors import CrispEditError

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("CRISPEDIT_SHARED_DATA", ROOT.parent / "shared" / "data"))
COUNTERFACT_EDIT = DATA / "counterfact" / "counterfact-edit.json"
COUNTERFACT_TRAIN = DATA / "counterfact" / "counterfact-train.json"
ZSRE = DATA / "zsre" / "zsre_mend_800.json"
WIKIBIGEDIT = DATA / "wikibigedit" / "wiki_big_edit_sample39.json"


def need(path: Path) -> Path:
    if not path.is_file():
        pytest.skip(f"shared data file {path} is absent (see ../shared/data/README.md)")
    return path


def write_json(path: Path, obj) -> Path:
    path.write_text(json.dumps(obj))
    return path


CF_RECORD = {
    "case_id": 7, "prompt": "The capital of X is", "target_new": "Lyon", "subject": "X", "ground_truth": "Paris",
    "rephrase_prompt": "X has its capital in", "locality_prompt": "The capital of Y is",
    "locality_ground_truth": "Rome",
}


# ---------------------------------------------------------------------------------------------
# real files


def test_counterfact_edit_file_maps_fields_and_warns_on_real_duplicates():
    with pytest.warns(UserWarning) as rec:
        reqs = load_requests(need(COUNTERFACT_EDIT))
    assert len(reqs) == 10_000
    assert reqs[0] == EditRequest(
        prompt="The mother tongue of Danielle Darrieux is",
        target="English",
        subject="Danielle Darrieux",
        ground_truth="French",
        rephrases=("Where Danielle Darrieux is from, people speak the language of",),
        locality=(LocalityPrompt("Michel Rocard is a native speaker of", "French"),),
        case_id="0",
    )
    r = reqs[17]
    assert (r.case_id, r.prompt, r.target, r.subject, r.ground_truth) == (
        "45", "Emilio Lussu speaks", "French", "Emilio Lussu", "Italian")
    assert r.rephrases == ("Emilio Lussu lives in",)
    assert r.locality == (LocalityPrompt("The language used by Lina Wertmüller is", "Italian"),)
    # The file really holds 4 duplicated (prompt, target) pairs; the warning names their indices.
    msgs = [str(w.message) for w in rec]
    dup = [m for m in msgs if "duplicate" in m]
    assert len(dup) == 1
    for pair in ("1691, 4108", "3239, 6100", "6476, 8823", "7733, 8355"):
        assert pair in dup[0]
    assert "counterfact-edit.json" in dup[0]


def test_counterfact_train_file_auto_detected_with_limit():
    reqs = load_requests(need(COUNTERFACT_TRAIN), limit=5)
    assert len(reqs) == 5
    assert reqs[0].case_id == "2"
    assert (reqs[0].prompt, reqs[0].target, reqs[0].ground_truth) == ("Toko Yasuda, the", "piano", "guitar")
    assert reqs[0].locality == (LocalityPrompt("John Lennon performs on the", "guitar"),)


def test_zsre_real_file_has_two_empty_targets():
    with pytest.raises(CrispEditError, match=r"^zsre_mend_800\.json: record 534: field 'alt' is empty$"):
        load_requests(need(ZSRE))
    with pytest.warns(UserWarning, match=r"skipped 2 invalid record\(s\).*record 534.*record 723"):
        reqs = load_requests(ZSRE, skip_invalid=True)
    assert len(reqs) == 798
    assert reqs[0] == EditRequest(
        prompt="What is the product made by UniFirst?",
        target="unmanned aircraft",
        subject="UniFirst",
        ground_truth="uniform",
        rephrases=("What will be the product of UniFirst?",),
        locality=(LocalityPrompt("John goodman's character in the big lebowski?", "Walter Sobchak"),),
        case_id="0",
    )
    # case ids are positions in the file, so skipped records leave a gap rather than renumbering.
    ids = [int(r.case_id) for r in reqs]
    assert 534 not in ids and 723 not in ids and ids[534] == 535
    for r in reqs:
        assert r.locality and not r.locality[0].prompt.lower().startswith("nq question")
        q = r.locality[0].prompt
        assert q.endswith("?") and q[0] == q[0].upper()


def test_zsre_limit_before_bad_records_needs_no_skipping():
    reqs = load_requests(need(ZSRE), limit=500)
    assert len(reqs) == 500 and reqs[-1].case_id == "499"


def test_zsre_ground_truth_is_first_answer():
    raw = json.loads(need(ZSRE).read_text())
    i = next(k for k, r in enumerate(raw) if len(r["answers"]) > 1)
    reqs = load_requests(ZSRE, limit=i + 1)
    assert reqs[i].ground_truth == raw[i]["answers"][0]
    assert reqs[i].target == raw[i]["alt"] and reqs[i].prompt == raw[i]["src"]


def test_wikibigedit_real_file():
    reqs = load_requests(need(WIKIBIGEDIT))
    assert len(reqs) == 39
    assert reqs[0] == EditRequest(
        prompt="In which traditional geographical division of Great Britain and Ireland is "
               "Crailing Parish Church located?",
        target="Roxburghshire",
        subject="Crailing Parish Church",
        ground_truth=None,
        rephrases=("In which traditional region of Great Britain and Ireland can Crailing Parish Church be found?",),
        locality=(LocalityPrompt("In which historic county is Carriden Parish Church located?", "West Lothian"),),
        case_id="0",
    )
    assert all(r.ground_truth is None for r in reqs)


def test_explicit_format_matches_auto():
    a = load_requests(need(WIKIBIGEDIT))
    b = load_requests(WIKIBIGEDIT, fmt="wikibigedit")
    assert a == b
    # A file without ground_truth is not CounterFact: asking for it names the missing field.
    with pytest.raises(CrispEditError, match=r"record 0: field 'ground_truth' is missing"):
        load_requests(WIKIBIGEDIT, fmt="counterfact")


# ---------------------------------------------------------------------------------------------
# schema variants


def test_easyedit_list_fields(tmp_path):
    rec = dict(CF_RECORD, target_new=["Lyon"], rephrase_prompt=["A", "", "B"],
               locality_prompt=["L1", "L2"], locality_ground_truth=["a1", ["a2", "alias"]])
    (r,) = load_requests(write_json(tmp_path / "cf.json", [rec]))
    assert r.target == "Lyon"
    assert r.rephrases == ("A", "B")
    assert r.locality == (LocalityPrompt("L1", "a1"), LocalityPrompt("L2", "a2"))
    # one locality prompt with a list of aliases as its answer
    rec2 = dict(CF_RECORD, locality_ground_truth=["Rome", "Roma"])
    (r2,) = load_requests(write_json(tmp_path / "cf2.json", [rec2]))
    assert r2.locality == (LocalityPrompt("The capital of Y is", "Rome"),)


def test_locality_answers_must_align(tmp_path):
    rec = dict(CF_RECORD, locality_prompt=["L1", "L2", "L3"], locality_ground_truth=["a", "b"])
    with pytest.raises(CrispEditError, match=r"record 0: field 'locality_ground_truth' has 2 answers for 3"):
        load_requests(write_json(tmp_path / "cf.json", [rec]))


def test_nq_question():
    assert nq_question("nq question: who voiced gaston in beauty and the beast 1991") == \
        "Who voiced gaston in beauty and the beast 1991?"
    assert nq_question("nq question: is it?") == "Is it?"
    assert nq_question("where is it") == "Where is it?"


@pytest.mark.parametrize("record, fmt", [
    (CF_RECORD, "counterfact"),
    ({k: v for k, v in CF_RECORD.items() if k != "ground_truth"}, "wikibigedit"),
    ({"src": "q", "alt": "a", "loc": "nq question: x", "loc_ans": "y"}, "zsre"),
    (EditRequest("p", "t").to_json(), "crispedit"),
    ({"question": "q"}, None),
    ([1, 2], None),
])
def test_detect_format(record, fmt):
    assert detect_format(record) == fmt


# ---------------------------------------------------------------------------------------------
# our JSONL


def _sample_requests() -> list[EditRequest]:
    return [
        EditRequest("The capital of X is", "Lyon", subject="X", ground_truth="Paris",
                    rephrases=("X's capital:", "Capital of X ="),
                    locality=(LocalityPrompt("The capital of Y is", "Rome"), LocalityPrompt("2+2=")),
                    case_id="a1"),
        EditRequest("Ünïcödé prompt —", "ταργετ"),
    ]


def test_jsonl_round_trip(tmp_path):
    reqs = _sample_requests()
    path = tmp_path / "sub" / "edits.jsonl"
    save_requests(path, reqs)
    assert [p.name for p in path.parent.iterdir()] == ["edits.jsonl"]  # no temp file left behind
    assert len(path.read_text(encoding="utf-8").splitlines()) == 2
    back = load_requests(path)
    assert back == reqs
    assert load_requests(path, fmt="crispedit") == reqs
    assert requests_fingerprint(back) == requests_fingerprint(reqs)


def test_crispedit_json_list_accepted(tmp_path):
    reqs = _sample_requests()
    path = write_json(tmp_path / "edits.json", [r.to_json() for r in reqs])
    assert load_requests(path) == reqs


def test_jsonl_detected_without_extension(tmp_path):
    path = tmp_path / "edits.json"
    path.write_text("\n".join(json.dumps(dict(CF_RECORD, case_id=i, prompt=f"p{i}")) for i in range(3)) + "\n")
    reqs = load_requests(path)
    assert [r.case_id for r in reqs] == ["0", "1", "2"]


def test_fingerprint_is_sensitive_and_order_dependent():
    reqs = _sample_requests()
    fp = requests_fingerprint(reqs)
    assert re.fullmatch(r"[0-9a-f]{64}", fp)
    assert requests_fingerprint(list(reversed(reqs))) != fp
    changed = [EditRequest(reqs[0].prompt, "Lyons", **{k: getattr(reqs[0], k) for k in
                                                       ("subject", "ground_truth", "rephrases", "locality",
                                                        "case_id")}), reqs[1]]
    assert requests_fingerprint(changed) != fp


def test_duplicates_warn_not_fail(tmp_path):
    path = write_json(tmp_path / "d.json", [CF_RECORD, dict(CF_RECORD, case_id=8), dict(CF_RECORD, target_new="Nice")])
    with pytest.warns(UserWarning, match=r"d\.json: 1 duplicate \(prompt, target\) pair\(s\): records 0, 1$"):
        reqs = load_requests(path)
    assert len(reqs) == 3


def test_no_warning_without_duplicates(tmp_path):
    path = write_json(tmp_path / "d.json", [CF_RECORD, dict(CF_RECORD, target_new="Nice")])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_requests(path)


# ---------------------------------------------------------------------------------------------
# bad inputs


def _cf_file(tmp_path, n_good: int, bad: dict, name: str = "counterfact-edit.json") -> Path:
    recs = [dict(CF_RECORD, case_id=i, prompt=f"p{i}") for i in range(n_good)] + [bad]
    return write_json(tmp_path / name, recs)


@pytest.mark.parametrize("bad, message", [
    (dict(CF_RECORD, target_new=""), "record 17: field 'target_new' is empty"),
    (dict(CF_RECORD, target_new="   "), "record 17: field 'target_new' is empty"),
    (dict(CF_RECORD, target_new=[]), "record 17: field 'target_new' is empty"),
    ({k: v for k, v in CF_RECORD.items() if k != "prompt"}, "record 17: field 'prompt' is missing"),
    (dict(CF_RECORD, prompt=None), "record 17: field 'prompt' is missing"),
    (dict(CF_RECORD, prompt=3), "record 17: field 'prompt' must be a string, got int"),
    (dict(CF_RECORD, rephrase_prompt=["ok", 5]), "record 17: field 'rephrase_prompt'[1] must be a string, got int"),
    (dict(CF_RECORD, case_id=[1]), "record 17: field 'case_id' must be a string or an integer, got list"),
])
def test_bad_counterfact_record_names_file_record_and_field(tmp_path, bad, message):
    path = _cf_file(tmp_path, 17, bad)
    with pytest.raises(CrispEditError) as e:
        load_requests(path)
    assert str(e.value) == f"counterfact-edit.json: {message}"


def test_record_not_an_object(tmp_path):
    path = write_json(tmp_path / "x.json", [CF_RECORD, "oops"])
    with pytest.raises(CrispEditError, match=r"^x\.json: record 1: is not a JSON object \(got str\)$"):
        load_requests(path)


def test_bad_zsre_and_crispedit_records(tmp_path):
    z = write_json(tmp_path / "z.json", [{"src": "q", "alt": "a", "loc": "nq question: x"}, {"src": "", "alt": "b"}])
    with pytest.raises(CrispEditError, match=r"^z\.json: record 1: field 'src' is empty$"):
        load_requests(z)
    c = tmp_path / "c.jsonl"
    c.write_text(json.dumps({"prompt": "p", "target": "t"}) + "\n\n" + json.dumps({"prompt": "p", "targte": "t"}))
    with pytest.raises(CrispEditError, match=r"^c\.jsonl: record 1 \(line 3\): unknown field 'targte'"):
        load_requests(c)
    c.write_text(json.dumps({"prompt": "p", "target": "t", "locality": [{"prompt": ""}]}))
    with pytest.raises(CrispEditError, match=r"record 0 \(line 1\): locality\[0\]: field 'prompt' is empty"):
        load_requests(c)


def test_invalid_json_names_line_and_column(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('[\n  {"prompt": "a",\n   "target_new": }\n]')
    with pytest.raises(CrispEditError, match=r"^broken\.json: invalid JSON at line 3, column 18: "):
        load_requests(path)


def test_invalid_jsonl_names_line(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text(json.dumps({"prompt": "p", "target": "t"}) + "\n" + '{"prompt": "p", "target": \n')
    with pytest.raises(CrispEditError, match=r"^broken\.jsonl: line 2: invalid JSON at column"):
        load_requests(path)


def test_unknown_format_lists_known_ones(tmp_path):
    path = write_json(tmp_path / "x.json", [CF_RECORD])
    with pytest.raises(CrispEditError) as e:
        load_requests(path, fmt="mquake")
    assert "'mquake'" in str(e.value)
    for name in FORMATS:
        assert name in str(e.value)


def test_undetectable_format(tmp_path):
    path = write_json(tmp_path / "x.json", [{"question": "q", "answer": "a"}])
    with pytest.raises(CrispEditError, match=r"x\.json: cannot detect the format.*'answer', 'question'"):
        load_requests(path)


@pytest.mark.parametrize("content, message", [
    ("[]", "contains no edit requests"),
    ('{"prompt": "p",\n "target": "t"}', "expected a JSON list of records"),
    ("42", "expected a JSON list of records, got int"),
    ("", "the file is empty"),
])
def test_bad_top_level(tmp_path, content, message):
    path = tmp_path / "x.json"
    path.write_text(content)
    with pytest.raises(CrispEditError, match=re.escape(message)):
        load_requests(path)


def test_missing_file_and_bad_limit(tmp_path):
    with pytest.raises(CrispEditError, match=r"edit request file not found: .*nope\.json"):
        load_requests(tmp_path / "nope.json")
    path = write_json(tmp_path / "x.json", [CF_RECORD])
    with pytest.raises(CrispEditError, match="limit must be a positive integer"):
        load_requests(path, limit=0)
