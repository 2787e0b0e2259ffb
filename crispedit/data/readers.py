"""Read edit requests from the common benchmark files (CounterFact, zsRE, WikiBigEdit) or our own JSONL.

Every reader produces the canonical `EditRequest`, so nothing downstream knows which data set a
request came from. Bad records fail loudly with the file, record index and field, because a silently
skipped or mis-mapped edit makes a benchmark number meaningless.
"""

from __future__ import annotations

import json
import os
import warnings
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from crispedit.data.records import EditRequest, LocalityPrompt
from crispedit.errors import CrispEditError, CrispEditWarning
from crispedit.io import atomic_path, jsonl_records, sha256_json

FORMATS = ("counterfact", "zsre", "wikibigedit", "crispedit")
# Longest text accepted in one field of an edit request (characters): far beyond any context window, and
# it stops a runaway line (a 50 MB field) before any tokenizer or model sees it.
MAX_TEXT_CHARS = 100_000
NQ_PREFIX = "nq question:"
_CRISPEDIT_FIELDS = ("prompt", "target", "subject", "ground_truth", "rephrases", "locality", "case_id")


class _RecordError(Exception):
    """Raised inside a record parser; turned into a CrispEditError naming the file and record."""


# ---------------------------------------------------------------------------------------------
# field helpers


def _required_text(rec: dict, key: str) -> str:
    """A non-empty string; a list is accepted if its first element is one (EasyEdit sometimes wraps)."""
    if key not in rec or rec[key] is None:
        raise _RecordError(f"field {key!r} is missing")
    value = rec[key]
    if isinstance(value, list):
        if not value:
            raise _RecordError(f"field {key!r} is empty")
        value = value[0]
    if not isinstance(value, str):
        raise _RecordError(f"field {key!r} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise _RecordError(f"field {key!r} is empty")
    _check_length(key, value)
    return value


def _check_length(key: str, value: str) -> None:
    if len(value) > MAX_TEXT_CHARS:
        raise _RecordError(f"field {key!r} has {len(value):,} characters; edit texts are at most "
                           f"{MAX_TEXT_CHARS:,} (is the file one runaway line?)")


def _optional_text(rec: dict, key: str) -> str | None:
    value = rec.get(key)
    if value is None or (isinstance(value, (str, list)) and not value):
        return None
    return _required_text(rec, key)


def _text_list(rec: dict, key: str) -> tuple[str, ...]:
    """A string or a list of strings (empty entries dropped)."""
    value = rec.get(key)
    if value is None:
        return ()
    items = value if isinstance(value, list) else [value]
    out = []
    for j, item in enumerate(items):
        if not isinstance(item, str):
            where = f"{key!r}[{j}]" if isinstance(value, list) else repr(key)
            raise _RecordError(f"field {where} must be a string, got {type(item).__name__}")
        if item.strip():
            _check_length(key, item)
            out.append(item)
    return tuple(out)


def _answer_list(rec: dict, key: str, n: int) -> list[str | None]:
    """Answers aligned with `n` locality prompts: a string (n == 1), a list of n answers, or absent."""
    value = rec.get(key)
    if value is None or value == "" or value == []:
        return [None] * n
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list):
        raise _RecordError(f"field {key!r} must be a string or a list, got {type(value).__name__}")
    if n == 1 and len(value) > 1 and all(isinstance(v, str) for v in value):
        value = [value[0]]  # several aliases of the one answer
    if len(value) != n:
        raise _RecordError(f"field {key!r} has {len(value)} answers for {n} locality prompts")
    out: list[str | None] = []
    for j, v in enumerate(value):
        if isinstance(v, list):  # aliases of one answer
            v = v[0] if v else None
        if v is not None and not isinstance(v, str):
            raise _RecordError(f"field {key!r}[{j}] must be a string, got {type(v).__name__}")
        if v:
            _check_length(key, v)
        out.append(v if v else None)
    return out


def _locality(rec: dict, prompt_key: str, answer_key: str) -> tuple[LocalityPrompt, ...]:
    prompts = _text_list(rec, prompt_key)
    answers = _answer_list(rec, answer_key, len(prompts)) if prompts else []
    return tuple(LocalityPrompt(p, a) for p, a in zip(prompts, answers))


def _case_id(rec: dict, index: int) -> str:
    value = rec.get("case_id")
    if value is None:
        return str(index)  # data sets without ids: the record's position in its file
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise _RecordError(f"field 'case_id' must be a string or an integer, got {type(value).__name__}")
    return str(value)


def nq_question(loc: str) -> str:
    """'nq question: who voiced gaston' → 'Who voiced gaston?' (the zsRE locality prompt as a question)."""
    q = loc.strip()
    if q.lower().startswith(NQ_PREFIX):
        q = q[len(NQ_PREFIX):].strip()
    if not q:
        return q
    q = q[0].upper() + q[1:]
    return q if q.endswith("?") else q + "?"


# ---------------------------------------------------------------------------------------------
# one parser per format: (record, index) -> EditRequest


def _parse_counterfact(rec: dict, index: int, *, need_ground_truth: bool = True) -> EditRequest:
    prompt = _required_text(rec, "prompt")
    target = _required_text(rec, "target_new")
    ground_truth = _required_text(rec, "ground_truth") if need_ground_truth else _optional_text(rec, "ground_truth")
    return EditRequest(
        prompt=prompt,
        target=target,
        subject=_optional_text(rec, "subject"),
        ground_truth=ground_truth,
        rephrases=_text_list(rec, "rephrase_prompt"),
        locality=_locality(rec, "locality_prompt", "locality_ground_truth"),
        case_id=_case_id(rec, index),
    )


def _parse_wikibigedit(rec: dict, index: int) -> EditRequest:
    return _parse_counterfact(rec, index, need_ground_truth=False)


def _parse_zsre(rec: dict, index: int) -> EditRequest:
    prompt = _required_text(rec, "src")
    target = _required_text(rec, "alt")
    answers = _text_list(rec, "answers")
    locality: tuple[LocalityPrompt, ...] = ()
    if _optional_text(rec, "loc"):
        question = nq_question(_required_text(rec, "loc"))
        if question:
            locality = (LocalityPrompt(question, _optional_text(rec, "loc_ans")),)
    return EditRequest(
        prompt=prompt,
        target=target,
        subject=_optional_text(rec, "subject"),
        ground_truth=answers[0] if answers else None,
        rephrases=_text_list(rec, "rephrase"),
        locality=locality,
        case_id=_case_id(rec, index),
    )


def _parse_crispedit(rec: dict, index: int) -> EditRequest:
    unknown = sorted(set(rec) - set(_CRISPEDIT_FIELDS))
    if unknown:
        raise _RecordError(f"unknown field {unknown[0]!r} (known: {', '.join(_CRISPEDIT_FIELDS)})")
    loc_raw = rec.get("locality") or []
    if not isinstance(loc_raw, list):
        raise _RecordError(f"field 'locality' must be a list, got {type(loc_raw).__name__}")
    locality = []
    for j, item in enumerate(loc_raw):
        if isinstance(item, str):
            item = {"prompt": item}
        if not isinstance(item, dict):
            raise _RecordError(f"field 'locality'[{j}] must be an object with 'prompt' and 'answer'")
        try:
            p = _required_text(item, "prompt")
            a = _optional_text(item, "answer")
        except _RecordError as e:
            raise _RecordError(f"locality[{j}]: {e}") from None
        locality.append(LocalityPrompt(p, a))
    if "rephrases" in rec and rec["rephrases"] is not None and not isinstance(rec["rephrases"], list):
        raise _RecordError(f"field 'rephrases' must be a list, got {type(rec['rephrases']).__name__}")
    case_id = rec.get("case_id")
    return EditRequest(
        prompt=_required_text(rec, "prompt"),
        target=_required_text(rec, "target"),
        subject=_optional_text(rec, "subject"),
        ground_truth=_optional_text(rec, "ground_truth"),
        rephrases=_text_list(rec, "rephrases"),
        locality=tuple(locality),
        case_id=None if case_id is None else _case_id(rec, index),
    )


_PARSERS: dict[str, Callable[[dict, int], EditRequest]] = {
    "counterfact": _parse_counterfact,
    "zsre": _parse_zsre,
    "wikibigedit": _parse_wikibigedit,
    "crispedit": _parse_crispedit,
}


# ---------------------------------------------------------------------------------------------
# files


def _read_records(path: Path) -> tuple[list[Any], list[int] | None]:
    """Records of a JSON list or a JSONL file, and (JSONL only) the line number of each record."""
    if not path.exists():
        raise CrispEditError(f"edit request file not found: {path}")
    if path.is_dir():
        raise CrispEditError(f"{path} is a folder; expected a .json or .jsonl file of edit requests")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise CrispEditError(f"{path.name}: cannot read: {e}") from e
    stripped = text.lstrip()
    if not stripped:
        raise CrispEditError(f"{path.name}: the file is empty")
    if path.suffix == ".jsonl" or (stripped and stripped[0] == "{" and _looks_like_jsonl(stripped)):
        parsed = list(jsonl_records(text, path.name))
        return [rec for _, rec in parsed], [lineno for lineno, _ in parsed]
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise CrispEditError(f"{path.name}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from e
    if isinstance(data, dict):
        raise CrispEditError(f"{path.name}: expected a JSON list of records (or JSONL, one record per line), "
                             f"got a single JSON object")
    if not isinstance(data, list):
        raise CrispEditError(f"{path.name}: expected a JSON list of records, got {type(data).__name__}")
    return data, None


def _looks_like_jsonl(text: str) -> bool:
    """A file starting with '{' is JSONL if its first line alone is a complete JSON object."""
    first = text.split("\n", 1)[0]
    try:
        return isinstance(json.loads(first), dict)
    except json.JSONDecodeError:
        return False


def detect_format(record: Any) -> str | None:
    """Guess the schema from the keys of one record (None if it matches none)."""
    if not isinstance(record, dict):
        return None
    keys = set(record)
    if "src" in keys and "alt" in keys:
        return "zsre"
    if "target_new" in keys:
        return "counterfact" if "ground_truth" in keys else "wikibigedit"
    if "prompt" in keys and "target" in keys:
        return "crispedit"
    return None


def _missing_field(record: Any) -> tuple[str, str] | None:
    """(data set, field) when a record has the other keys of a known format but lacks its defining one,
    e.g. a CounterFact record without 'target_new' (rather than "cannot detect the format")."""
    if not isinstance(record, dict):
        return None
    keys = set(record)
    if "prompt" in keys and keys & {"ground_truth", "rephrase_prompt", "locality_prompt", "locality_ground_truth"}:
        return "CounterFact", "target_new"
    if "src" in keys and keys & {"answers", "rephrase", "loc", "loc_ans"}:
        return "zsRE", "alt"
    return None


def _where(path: Path, index: int, lines: list[int] | None) -> str:
    return f"{path.name}: record {index}" + (f" (line {lines[index]})" if lines is not None else "")


def load_requests(path: str | os.PathLike, fmt: str = "auto", limit: int | None = None,
                  skip_invalid: bool = False) -> list[EditRequest]:
    """Read edit requests; `fmt` is one of FORMATS or "auto" (detected from the first record's keys).

    `limit` keeps the first `limit` requests. With `skip_invalid`, bad records are dropped with one
    warning naming them instead of raising (the zsRE file has two records with an empty target).
    """
    path = Path(path)
    if fmt != "auto" and fmt not in FORMATS:
        raise CrispEditError(f"unknown edit request format {fmt!r}; known formats: auto, {', '.join(FORMATS)}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise CrispEditError(f"limit must be a positive integer, got {limit!r}")
    records, lines = _read_records(path)
    if not records:
        raise CrispEditError(f"{path.name}: contains no edit requests")
    if fmt == "auto":
        fmt = detect_format(records[0])
        if fmt is None:
            missing = _missing_field(records[0])
            if missing is not None:
                like, field = missing
                raise CrispEditError(f"{_where(path, 0, lines)}: field {field!r} is missing (the record looks like "
                                     f"{like}: it has {', '.join(sorted(records[0]))})")
            keys = sorted(records[0]) if isinstance(records[0], dict) else type(records[0]).__name__
            raise CrispEditError(
                f"{path.name}: cannot detect the format from the keys of record 0 ({keys}); "
                f"pass the format explicitly, one of: {', '.join(FORMATS)}")
    parse = _PARSERS[fmt]
    requests: list[EditRequest] = []
    indices: list[int] = []
    skipped: list[str] = []
    for i, rec in enumerate(records):
        if limit is not None and len(requests) >= limit:
            break
        try:
            if not isinstance(rec, dict):
                raise _RecordError(f"is not a JSON object (got {type(rec).__name__})")
            req = parse(rec, i)
        except _RecordError as e:
            msg = f"{_where(path, i, lines)}: {e}"
            if not skip_invalid:
                raise CrispEditError(msg) from None
            skipped.append(msg)
            continue
        requests.append(req)
        indices.append(i)
    if skipped:
        warnings.warn(f"skipped {len(skipped)} invalid record(s): " + "; ".join(skipped), CrispEditWarning,
                      stacklevel=2)
    if not requests:
        raise CrispEditError(f"{path.name}: contains no valid edit requests")
    _warn_duplicates(path, requests, indices)
    return requests


def _warn_duplicates(path: Path, requests: Sequence[EditRequest], indices: Sequence[int]) -> None:
    seen: dict[tuple[str, str], list[int]] = defaultdict(list)
    for req, i in zip(requests, indices):
        seen[(req.prompt, req.target)].append(i)
    dups = [ix for ix in seen.values() if len(ix) > 1]
    if dups:
        shown = "; ".join("records " + ", ".join(map(str, ix)) for ix in dups[:10])
        more = f" (and {len(dups) - 10} more)" if len(dups) > 10 else ""
        warnings.warn(f"{path.name}: {len(dups)} duplicate (prompt, target) pair(s): {shown}{more}", CrispEditWarning,
                      stacklevel=3)


def save_requests(path: str | os.PathLike, requests: Iterable[EditRequest]) -> None:
    """Write requests as our JSONL (one EditRequest.to_json() per line), atomically."""
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            for req in requests:
                f.write(json.dumps(req.to_json(), ensure_ascii=False) + "\n")


def requests_fingerprint(requests: Iterable[EditRequest]) -> str:
    """sha256 of the requests' canonical JSON: identifies an edit set in caches and reports."""
    return sha256_json([r.to_json() for r in requests])


# ---------------------------------------------------------------------------------------------
# checks that need the tokenizer (run before any compute)


def _texts(req: EditRequest) -> list[tuple[str, str]]:
    out = [("prompt", req.prompt), ("target", req.target)]
    out += [(f"rephrases[{j}]", r) for j, r in enumerate(req.rephrases)]
    for j, loc in enumerate(req.locality):
        out.append((f"locality[{j}].prompt", loc.prompt))
        if loc.answer:
            out.append((f"locality[{j}].answer", loc.answer))
    return out


def control_tokens(tokenizer) -> list[str]:
    """The texts a tokenizer turns into special (control) tokens: `<|im_end|>`, `</s>`, ..."""
    specials = set(getattr(tokenizer, "all_special_tokens", []) or [])
    for tok in (getattr(tokenizer, "added_tokens_decoder", None) or {}).values():
        if getattr(tok, "special", False):
            specials.add(str(tok))
    return sorted((t for t in specials if t and len(t) > 1), key=len, reverse=True)


def check_control_tokens(tokenizer, requests: Sequence[EditRequest]) -> None:
    """Refuse requests whose text contains a control token's spelling: the tokenizer would read `<|im_end|>`
    in a prompt as the end-of-turn token itself, so the model would be trained on a token sequence no user
    text can produce (and a chat-formatted edit would end its turn early)."""
    specials = control_tokens(tokenizer)
    if not specials:
        return
    for i, req in enumerate(requests):
        for field, text in _texts(req):
            hit = next((t for t in specials if t in text), None)
            if hit is not None:
                cid = f" (case_id {req.case_id})" if req.case_id is not None else ""
                raise CrispEditError(f"edit request {i}{cid}: field {field!r} contains {hit!r}, the spelling of a "
                                     "control token of this tokenizer; it would be read as that token, not as "
                                     "text. Remove it from the edit data")


def max_positions(model) -> int | None:
    """The longest sequence the model's positions cover (None if its config does not say)."""
    cfg = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        v = getattr(cfg, key, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def check_requests_fit(tokenizer, requests: Sequence[EditRequest], limit: int | None,
                       contexts: Sequence[str] = ("raw",)) -> None:
    """Every edit sequence (prompt + target + end token in each training context, as the editor builds it)
    fits in `limit` positions; otherwise a one-line error naming the request, before any forward pass.
    (Model-written prefixes, when asked for, come on top and are short.)"""
    from crispedit.formatting import PromptFormat, encode_pair, has_chat_template, resolve_contexts

    check_control_tokens(tokenizer, requests)
    if limit is None:
        return
    names = [str(c) for c in contexts if str(c) != "chat" or has_chat_template(tokenizer)]
    fmts = [PromptFormat(context=c) for c in resolve_contexts(names, tokenizer)]
    for i, req in enumerate(requests):
        n = max((len(encode_pair(tokenizer, req.prompt, req.target, f, add_eos=True).input_ids) for f in fmts),
                default=0)
        if n > limit:
            cid = f" (case_id {req.case_id})" if req.case_id is not None else ""
            raise CrispEditError(f"edit request {i}{cid}: prompt and target are {n:,} tokens, longer than the "
                                 f"model's context of {limit:,} positions; shorten it or drop it")


def evenly_spaced(items: Sequence[Any], k: int | None) -> list[Any]:
    """`k` items spread evenly over the sequence (all of them if k is None or not smaller): judging a sample of a
    long batch this way covers every part of it (its first and last facts alike), deterministically."""
    if k is None or k >= len(items):
        return list(items)
    return [items[(i * len(items)) // k] for i in range(k)]
