"""The hostile-input and fault suite (issue 11): nothing lost, nothing silently wrong, no tracebacks.

Tiny sizes throughout: a 2-layer Llama saved to a folder, the in-memory BPE tokenizer, a few edit requests.
Kills are real SIGKILLs, injected deterministically through crispedit.io's test hook
(CRISPEDIT_TEST_FAULT=between-renames[:N] kills a process between the two renames of a folder swap).
"""

from __future__ import annotations

import json
import os
import random
import re
import resource
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from crispedit.cli import main
from crispedit.errors import CrispEditError
from crispedit.io import FAULT_ENV, atomic_dir, output_kind, recover_dir

WORDS = ("the cat sat on a mat and Paris is the capital of France while Rome has the Colosseum "
         "Shakespeare wrote Hamlet answer question yes no").split()
LAYER = "model.layers.1.mlp.down_proj"
REQUESTS = [
    {"prompt": "The capital of France is", "target": "Rome"},
    {"prompt": "Shakespeare wrote", "target": "the cat"},
    {"prompt": "The Colosseum is in", "target": "Paris"},
]
ENV = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")


# ------------------------------------------------------------------------------------------ fixtures


def save_tiny_model(folder: Path, tokenizer, seed: int = 0, tie: bool = False) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=tie, pad_token_id=tokenizer.pad_token_id,
                      eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
    torch.manual_seed(seed)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def write_requests(path: Path, requests=REQUESTS) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in requests))
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory, byte_bpe_tokenizer) -> dict[str, Path]:
    """A model folder, a corpus, edit requests and a curvature cache (built once for the module)."""
    root = tmp_path_factory.mktemp("faults")
    rng = random.Random(0)
    corpus = root / "corpus.txt"
    corpus.write_text("\n".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 20)))
                                for _ in range(40)) + "\n")
    model = save_tiny_model(root / "model", byte_bpe_tokenizer)
    edits = write_requests(root / "edits.jsonl")
    cache = root / "cache"
    code = run_main("curvature", "--model", model, "--corpus", corpus, "--layers", LAYER, "--max-length", "24",
                    "--samples", "6", "--batch-size", "3", "--out", cache)
    assert code == 0
    return {"root": root, "model": model, "corpus": corpus, "edits": edits, "cache": cache}


def run_main(*args) -> int:
    try:
        main([str(a) for a in args])
    except SystemExit as e:
        return int(e.code or 0)
    return 0


@pytest.fixture
def cli(capsys):
    """cli(*args) -> (exit status, stdout, stderr)."""

    def run(*args):
        code = run_main(*args)
        out, err = capsys.readouterr()
        return code, out, err

    return run


def error_line(err: str) -> str:
    lines = [s.strip() for ln in err.splitlines() for s in ln.split("\r") if s.strip()]
    lines = [ln for ln in lines if "it/s]" not in ln and "batch/s]" not in ln and "?it/s" not in ln]
    assert len(lines) == 1 and lines[0].startswith("crispedit: error: "), lines
    assert "Traceback" not in err
    return lines[0]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def ft_edit_args(world, out, *extra) -> list:
    return ["edit", "--model", world["model"], "--edits", world["edits"], "--method", "ft", "--layers", LAYER,
            "--epochs", "1", "--out", out, *extra]


class NoModelLoad(Exception):
    """Raised instead of loading a model: the check under test must come before the work."""


@pytest.fixture
def no_model_load(monkeypatch):
    from crispedit.models import loading

    def refuse(*a, **k):
        raise NoModelLoad()

    monkeypatch.setattr(loading, "load_model", refuse)
    import crispedit.models

    monkeypatch.setattr(crispedit.models, "load_model", refuse)


# ------------------------------------------------------------------------------------------ data lost


def test_force_never_replaces_the_input_model_or_a_folder_holding_it(world, cli, tmp_path):
    model = world["model"]
    before = snapshot(model)
    for out in (model, model.parent):
        code, _, err = cli(*ft_edit_args(world, out, "--force"))
        assert code == 2
        line = error_line(err)
        assert "refusing to write" in line and ("is the input" in line or "contains the input" in line), line
    inside = model / "edited"
    code, _, err = cli(*ft_edit_args(world, inside, "--force"))
    assert code == 2 and "lies inside the input" in error_line(err)
    # The curvature command and merge refuse these too (they only ever replace a curvature cache).
    code, _, err = cli("curvature", "--model", model, "--corpus", world["corpus"], "--out", model, "--force")
    assert code == 2 and "not a crispedit curvature cache" in error_line(err)
    code, _, err = cli("curvature-merge", world["cache"], world["cache"], "--out", model.parent, "--force")
    assert code == 2
    # Nothing is written inside the model folder either: a cache, a report, a sequential state.
    code, _, err = cli("curvature", "--model", model, "--corpus", world["corpus"], "--out", model / "cache")
    assert code == 2 and "lies inside the input" in error_line(err)
    code, _, err = cli("eval", "--model", model, "--out", model / "report.json")
    assert code == 2 and "lies inside the input" in error_line(err)
    code, _, err = cli("edit", "--model", model, "--edits", world["edits"], "--curvature", world["cache"],
                       "--sequential", "--state", model / "state", "--out", tmp_path / "seq")
    assert code == 2 and "lies inside the input" in error_line(err)
    assert snapshot(model) == before and not inside.exists()


def test_force_only_replaces_this_tools_output_of_the_same_kind(world, cli, tmp_path):
    mine = tmp_path / "results"
    mine.mkdir()
    (mine / "notes.txt").write_text("a month of notes")
    code, _, err = cli(*ft_edit_args(world, mine, "--force"))
    assert code == 2 and "crispedit did not write it" in error_line(err)
    assert (mine / "notes.txt").read_text() == "a month of notes"

    out = tmp_path / "out"
    assert cli(*ft_edit_args(world, out))[0] == 0
    assert output_kind(out) == "edit-output"
    code, _, err = cli(*ft_edit_args(world, out))
    assert code == 2 and "--force" in error_line(err)
    assert cli(*ft_edit_args(world, out, "--force", "--seed", "1"))[0] == 0
    assert json.loads((out / "run.json").read_text())["config"]["seed"] == 1

    # A crispedit folder of another kind (a curvature cache) is not an edit output.
    code, _, err = cli(*ft_edit_args(world, world["cache"], "--force"))
    assert code == 2 and "is a crispedit curvature-cache, not a edit-output" in error_line(err)
    # --out naming a file: no suggestion to --force it away.
    f = tmp_path / "file.txt"
    f.write_text("x")
    code, _, err = cli(*ft_edit_args(world, f, "--force"))
    line = error_line(err)
    assert code == 2 and "is an existing file" in line and "--force" not in line
    assert f.read_text() == "x"


def test_demo_never_replaces_a_folder_it_did_not_write(tmp_path, no_model_load):
    from crispedit.demo import DemoConfig, run_demo

    existing = tmp_path / "crispedit-demo"
    existing.mkdir()
    (existing / "thesis.tex").write_text("\\documentclass{article}")
    with pytest.raises(CrispEditError, match="crispedit did not write it"):
        run_demo(DemoConfig(out=str(existing)), progress=False, echo=lambda *a: None)
    assert (existing / "thesis.tex").read_text() == "\\documentclass{article}"
    # A previous demo report (its demo.json says so) is what the demo may replace.
    (existing / "thesis.tex").unlink()
    with atomic_dir(existing, overwrite=True, kind="demo-report") as tmp:
        (tmp / "demo.json").write_text(json.dumps({"curvature_cache": "c", "summary": {}}))
    with pytest.raises(NoModelLoad):
        run_demo(DemoConfig(out=str(existing)), progress=False, echo=lambda *a: None)


SWAP_SCRIPT = """
import json, sys
from crispedit.io import atomic_dir
with atomic_dir(sys.argv[1], overwrite=True, kind="demo-report") as tmp:
    (tmp / "data.txt").write_text("new version")
    (tmp / "demo.json").write_text(json.dumps({"curvature_cache": "c", "summary": {}}))
print("swapped")
"""


def swap_in_subprocess(path: Path, fault: str | None) -> subprocess.CompletedProcess:
    env = dict(ENV)
    env.pop(FAULT_ENV, None)
    if fault:
        env[FAULT_ENV] = fault
    return subprocess.run([sys.executable, "-c", SWAP_SCRIPT, str(path)], capture_output=True, text=True,
                          env=env, timeout=120)


def test_sigkill_between_the_two_renames_loses_nothing(tmp_path):
    path = tmp_path / "out"
    with atomic_dir(path, kind="demo-report") as tmp:
        (tmp / "data.txt").write_text("old version")
        (tmp / "demo.json").write_text(json.dumps({"curvature_cache": "c", "summary": {}}))

    done = swap_in_subprocess(path, "between-renames")
    assert done.returncode == -signal.SIGKILL, done.stderr
    # The moment of the kill: the folder is gone, its previous version is in .out.old, the new one in a
    # temporary folder of the dead process.
    assert not path.exists() and (tmp_path / ".out.old" / "data.txt").read_text() == "old version"
    stale = [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert len(stale) == 1

    assert recover_dir(path) == "restored"  # what every reader and writer does first
    assert (path / "data.txt").read_text() == "old version"
    assert recover_dir(path) is None

    # The next write cleans up the dead process's temporary folder and swaps normally.
    done = swap_in_subprocess(path, None)
    assert done.returncode == 0 and "swapped" in done.stdout, done.stderr
    assert (path / "data.txt").read_text() == "new version"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_killed_swap_of_a_cache_is_recovered_by_its_reader(world, tmp_path):
    from crispedit.curvature.api import Curvature

    cache = tmp_path / "cache"
    Curvature.load(world["cache"]).save(cache)
    before = snapshot(cache)
    os.replace(cache, tmp_path / ".cache.old")  # exactly what a kill between the renames leaves
    rec = Curvature.load(cache).record  # the reader restores it
    assert rec["format"] == "crispedit-curvature" and snapshot(cache) == before


def test_eval_report_md_does_not_overwrite_the_json(tmp_path):
    from crispedit.evaluation.report import EvalReport, load_report, write_report

    rep = EvalReport(summary={"reliability": 0.5})
    js, md = write_report(rep, tmp_path / "x.md")
    assert (js, md) == (tmp_path / "x.json", tmp_path / "x.md")
    assert load_report(js).summary == {"reliability": 0.5}
    assert not md.read_text().lstrip().startswith("{")


def test_output_files_follow_the_umask(world, cli, tmp_path):
    old = os.umask(0o022)
    try:
        out = tmp_path / "out"
        assert cli(*ft_edit_args(world, out))[0] == 0
        cache = tmp_path / "cache"
        from crispedit.curvature.api import Curvature

        Curvature.load(world["cache"]).save(cache)
    finally:
        os.umask(old)
    for p in list(out.rglob("*")) + list(cache.rglob("*")):
        mode = stat.S_IMODE(p.stat().st_mode)
        assert mode == (0o755 if p.is_dir() else 0o644), (p, oct(mode))


# ------------------------------------------------------------------------------------------ silent wrong results


def sequential_args(world, out) -> list[str]:
    return ["-m", "crispedit", "edit", "--model", str(world["model"]), "--edits", str(world["edits"]),
            "--curvature", str(world["cache"]), "--sequential", "--chunk-size", "1", "--epochs", "3",
            "--batch-size", "1", "--lr", "0.02", "--out", str(out)]


def run_cli_process(args: list[str], fault: str | None = None) -> subprocess.CompletedProcess:
    env = dict(ENV)
    env.pop(FAULT_ENV, None)
    if fault:
        env[FAULT_ENV] = fault
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=600)


def test_sequential_killed_and_resumed_equals_uninterrupted_bit_for_bit(world, tmp_path):
    straight = tmp_path / "straight"
    done = run_cli_process(sequential_args(world, straight))
    assert done.returncode == 0, done.stderr[-3000:]

    out = tmp_path / "resumed"
    state = tmp_path / "resumed.state"
    # Killed while the state after the second chunk replaces the one after the first.
    killed = run_cli_process(sequential_args(world, out), fault="between-renames:2")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert not out.exists() and not state.exists() and (tmp_path / ".resumed.state.old").is_dir()

    # The same command with --resume: the state after chunk 1 comes back, chunks 2 and 3 are edited once.
    resumed = run_cli_process(sequential_args(world, out) + ["--resume"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = load_file(str(straight / "delta" / "delta.safetensors")), load_file(str(out / "delta" / "delta.safetensors"))
    assert sorted(a) == sorted(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    wa = load_file(str(straight / "model" / "model.safetensors"))
    wb = load_file(str(out / "model" / "model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    st = json.loads((state / "state.json").read_text())
    assert st["n_edits"] == 3 and len(st["chunks"]) == 3 and len(st["done_requests"]) == 3
    run = json.loads((out / "run.json").read_text())
    assert [c["chunk"] for c in run["chunks"]] == [0, 1, 2]
    leftovers = sorted(p.name for p in tmp_path.iterdir())
    assert leftovers == ["resumed", "resumed.state", "straight", "straight.state"], leftovers


def test_resume_with_the_same_command_does_not_edit_again(world, tmp_path, byte_bpe_tokenizer):
    from crispedit.data.readers import load_requests
    from crispedit.editing.config import EditConfig
    from crispedit.editing.run import EditJob, run_edit
    from crispedit.models.loading import load_model

    reqs = load_requests(world["edits"])
    cfg = EditConfig(epochs=2, batch_size=1)
    model, tok = load_model(str(world["model"]))
    job = EditJob(requests=reqs[:2], cfg=cfg, curvature_path=str(world["cache"]), sequential=True, chunk_size=1,
                  state_dir=str(tmp_path / "state"))
    run_edit(model, tok, job, tmp_path / "a", progress=False)
    model, tok = load_model(str(world["model"]))
    again = EditJob(**{**job.__dict__, "requests": reqs, "resume": True})
    rec = run_edit(model, tok, again, tmp_path / "b", progress=False)
    assert [c["chunk"] for c in rec["chunks"]] == [0, 1, 2] and rec["chunks"][2]["n_edits"] == 1
    st = json.loads((tmp_path / "state" / "state.json").read_text())
    assert st["n_edits"] == 3
    # Everything done: a further resume edits nothing and writes the same delta.
    model, tok = load_model(str(world["model"]))
    rec = run_edit(model, tok, again, tmp_path / "c", progress=False)
    assert len(rec["chunks"]) == 3 and rec["step_losses"] == []
    assert torch.equal(load_file(str(tmp_path / "b/delta/delta.safetensors"))[f"{LAYER}.delta"],
                       load_file(str(tmp_path / "c/delta/delta.safetensors"))[f"{LAYER}.delta"])
    # Other requests than the state's are refused, not silently appended.
    changed = [reqs[1], reqs[0], reqs[2]]
    model, tok = load_model(str(world["model"]))
    with pytest.raises(CrispEditError, match="request 0 of the 3 given differs"):
        run_edit(model, tok, EditJob(**{**again.__dict__, "requests": changed}), tmp_path / "d", progress=False)
    model, tok = load_model(str(world["model"]))
    with pytest.raises(CrispEditError, match="resume with chunk_size=1"):
        run_edit(model, tok, EditJob(**{**again.__dict__, "chunk_size": 2}), tmp_path / "d", progress=False)


def rewrite_record(cache: Path, **changes) -> None:
    """Edit curvature.json the way a user (or a bug) might, keeping it valid JSON."""
    rec = json.loads((cache / "curvature.json").read_text())
    for k, v in changes.items():
        rec[k] = v
    (cache / "curvature.json").write_text(json.dumps(rec))


def copy_cache(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_cache_files_are_bound_to_their_record(world, tmp_path, byte_bpe_tokenizer):
    from crispedit.curvature.api import Curvature
    from crispedit.curvature.cache import CacheIntegrityError
    from crispedit.models.loading import load_model

    model, _ = load_model(str(world["model"]))
    good = world["cache"]
    # Another cache's eigen.safetensors (same model and shapes, other corpus: same size, other bytes).
    other = tmp_path / "other"
    assert run_main("curvature", "--model", world["model"], "--corpus", world["corpus"], "--layers", LAYER,
                    "--max-length", "24", "--samples", "6", "--batch-size", "3", "--seed", "5", "--out", other) == 0
    swapped = copy_cache(good, tmp_path / "swapped")
    (swapped / "eigen.safetensors").write_bytes((other / "eigen.safetensors").read_bytes())
    with pytest.raises(CacheIntegrityError, match=r"eigen\.safetensors: not the file this cache was written with"):
        Curvature.load(swapped, model)

    # An edited token count (or any other field).
    edited = copy_cache(good, tmp_path / "edited")
    rec = json.loads((edited / "curvature.json").read_text())
    rec["counts"][LAYER]["n"] *= 10
    (edited / "curvature.json").write_text(json.dumps(rec))
    with pytest.raises(CacheIntegrityError, match="the record was edited"):
        Curvature.load(edited, model)

    # A truncated file is noticed by `curvature info` (sizes are checked without reading the tensors).
    cut = copy_cache(good, tmp_path / "cut")
    data = (cut / "stats.safetensors").read_bytes()
    (cut / "stats.safetensors").write_bytes(data[: len(data) // 2])
    code = run_main("curvature-info", cut)
    assert code == 2
    with pytest.raises(CacheIntegrityError, match="truncated or corrupt"):
        Curvature.load(cut, model)
    assert Curvature.load(good, model).targets == [LAYER]


def test_impossible_cache_values_are_refused_with_the_tensor_named(world, tmp_path):
    from crispedit.curvature.api import Curvature
    from crispedit.curvature.cache import CacheIntegrityError, save_cache

    cur = Curvature.load(world["cache"])
    cases = {
        "nan_eigenvalue": ("eigen", "lam_S", lambda t: t.index_fill(0, torch.tensor([3]), float("nan")),
                           r"lam_S holds NaN or inf"),
        "negative_eigenvalue": ("eigen", "lam_S", lambda t: t - 2 * float(t.max()), r"lam_S has negative entries"),
        "wrong_shape": ("stats", "A", lambda t: t[:-1, :-1].contiguous(), r"A has shape \[63, 63\], expected \[64, 64\]"),
    }
    for name, (where, key, change, message) in cases.items():
        stats, eigen = cur.stats.clone(), dict(cur.eigen)
        if where == "eigen":
            e = eigen[LAYER]
            eigen[LAYER] = type(e)(**{**e.__dict__, key: change(getattr(e, key))})
        else:
            setattr(stats[LAYER], key, change(getattr(stats[LAYER], key)))
        path = save_cache(tmp_path / name, stats, eigen, cur.record)  # a writer with a bug: hashes match
        with pytest.raises(CacheIntegrityError, match=message):
            Curvature.load(path)


def test_nan_statistics_and_an_empty_kept_subspace_fail_loudly(world):
    from crispedit.curvature.api import Curvature

    cur = Curvature.load(world["cache"])
    bad = cur.stats.clone()
    bad[LAYER].S[0, 0] = float("nan")
    with pytest.raises(CrispEditError, match=r"statistics of target .* contain NaN"):
        Curvature.from_stats(bad, cur.record)
    # Every direction removed: the edit would exit 0 with ΔW = 0. Refused instead.
    e = cur.eigen[LAYER]
    e.lam_A[e.n_sink:] = float("inf")
    with pytest.raises(CrispEditError, match="nothing is editable"):
        cur.projectors(0.9)


def test_merging_a_cache_with_itself_is_refused(world, cli, tmp_path):
    from crispedit.curvature.api import Curvature
    from crispedit.curvature.cache import CacheMismatchError

    cur = Curvature.load(world["cache"])
    with pytest.raises(CacheMismatchError, match="would count those tokens twice"):
        cur.merge(cur)
    copy = copy_cache(world["cache"], tmp_path / "copy")
    code, _, err = cli("curvature-merge", world["cache"], copy, "--out", tmp_path / "merged")
    assert code == 2 and "count those tokens twice" in error_line(err) and not (tmp_path / "merged").exists()


def test_a_tied_lm_head_is_not_edited(tmp_path, byte_bpe_tokenizer):
    from crispedit.data.records import EditRequest
    from crispedit.editing.config import EditConfig
    from crispedit.editing.engine import edit
    from crispedit.models.loading import load_model

    model, tok = load_model(str(save_tiny_model(tmp_path / "tied", byte_bpe_tokenizer, tie=True)))
    embed = model.get_input_embeddings().weight.detach().clone()
    with pytest.raises(CrispEditError, match=r"'lm_head' shares its weight with model\.embed_tokens\.weight"):
        edit(model, tok, [EditRequest("The capital of France is", "Rome")], ["lm_head"], EditConfig(method="ft"),
             progress=False)
    assert torch.equal(model.get_input_embeddings().weight, embed)


def test_control_token_text_in_edit_data_is_refused(world, cli, tmp_path):
    edits = write_requests(tmp_path / "e.jsonl", [{"prompt": "The capital of France is<eos>", "target": "Rome"}])
    code, _, err = cli("edit", "--model", world["model"], "--edits", edits, "--method", "ft", "--layers", LAYER,
                       "--out", tmp_path / "out")
    assert code == 2
    assert "field 'prompt' contains '<eos>', the spelling of a control token" in error_line(err)
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------ tracebacks, late failures


def test_damaged_model_files_give_one_line_naming_the_file(world, cli, tmp_path, byte_bpe_tokenizer):
    import shutil

    cut = tmp_path / "cut"
    shutil.copytree(world["model"], cut)
    data = (cut / "model.safetensors").read_bytes()
    (cut / "model.safetensors").write_bytes(data[: len(data) // 3])
    code, _, err = cli("targets", cut)
    line = error_line(err)
    assert code == 2 and f"{cut / 'model.safetensors'} is truncated or corrupt" in line

    # A pickle that runs code when loaded: refused, and the code did not run.
    evil = tmp_path / "evil"
    shutil.copytree(world["model"], evil)
    (evil / "model.safetensors").unlink()
    sentinel = tmp_path / "PWNED"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {sentinel}",))

    torch.save({"model.embed_tokens.weight": Payload()}, evil / "pytorch_model.bin")
    code, _, err = cli("targets", evil)
    line = error_line(err)
    assert code == 2 and "refusing to load" in line and "pytorch_model.bin" in line and "could run code" in line
    assert not sentinel.exists()

    # Custom code: the message names the option that allows it.
    custom = tmp_path / "custom"
    shutil.copytree(world["model"], custom)
    cfg = json.loads((custom / "config.json").read_text())
    cfg.update(model_type="notarealmodel", auto_map={"AutoConfig": "x.C", "AutoModelForCausalLM": "x.M"})
    (custom / "config.json").write_text(json.dumps(cfg))
    (custom / "x.py").write_text(f"open({str(sentinel)!r}, 'w').close()\n")
    code, _, err = cli("targets", custom)
    assert code == 2 and "--trust-remote-code" in error_line(err) and not sentinel.exists()


def test_truncated_gguf_says_truncated_or_corrupt(tmp_path, monkeypatch):
    from crispedit.models import loading

    monkeypatch.setenv("CRISPEDIT_HOME", str(tmp_path / "home"))
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\x00" * 10)
    with pytest.raises(CrispEditError, match=r"cut\.gguf: it is truncated or corrupt"):
        loading.load_model(str(cut))
    other = tmp_path / "other.gguf"
    other.write_bytes(b"PK\x03\x04 not a gguf")
    with pytest.raises(CrispEditError, match="is not a GGUF file"):
        loading.load_model(str(other))
    assert not any((tmp_path / "home" / "models").iterdir())


def test_a_damaged_converted_copy_is_converted_again(tmp_path, monkeypatch, byte_bpe_tokenizer):
    from crispedit.models import loading

    monkeypatch.setenv("CRISPEDIT_HOME", str(tmp_path / "home"))
    calls = []

    def convert(gguf: Path, out: Path) -> None:
        calls.append(gguf)
        save_tiny_model(out, byte_bpe_tokenizer)

    monkeypatch.setattr(loading, "_convert_gguf", convert)
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF-fake")
    loading.load_model(str(gguf))
    folder = loading.resolve_model_spec(str(gguf)).path
    weights = folder / "model.safetensors"
    assert stat.S_IMODE(weights.stat().st_mode) & 0o044  # readable by others (umask), not 0600

    data = weights.read_bytes()
    weights.write_bytes(data[:-100])  # truncated: the size in the conversion record no longer matches
    loading.load_model(str(gguf))
    assert len(calls) == 2 and weights.stat().st_size == len(data)

    garbled = bytearray(data)
    garbled[8:24] = b"#" * 16  # same size, unreadable header: the load fails, the copy is redone once
    weights.write_bytes(bytes(garbled))
    model, _ = loading.load_model(str(gguf))
    assert len(calls) == 3 and weights.read_bytes() == data


def test_damaged_or_edited_deltas_are_refused(world, cli, tmp_path):
    from crispedit.editing.delta import EditDelta

    out = tmp_path / "out"
    assert cli(*ft_edit_args(world, out, "--no-save-model"))[0] == 0
    delta = out / "delta"
    EditDelta.load(delta)

    import shutil

    cut = shutil.copytree(delta, tmp_path / "cut")
    data = (cut / "delta.safetensors").read_bytes()
    (cut / "delta.safetensors").write_bytes(data[:-8])
    with pytest.raises(CrispEditError, match=r"delta\.safetensors: truncated or corrupt"):
        EditDelta.load(cut)

    renamed = shutil.copytree(delta, tmp_path / "renamed")
    rec = json.loads((renamed / "delta.json").read_text())
    rec["targets"][0]["name"] = "model.layers.0.mlp.down_proj"
    (renamed / "delta.json").write_text(json.dumps(rec))
    with pytest.raises(CrispEditError, match="the record was edited"):
        EditDelta.load(renamed)
    # Even with a consistent hash, a target without tensors is named (not a KeyError).
    from crispedit.io import record_hash

    rec["integrity"]["record_sha256"] = record_hash(rec)
    (renamed / "delta.json").write_text(json.dumps(rec))
    with pytest.raises(CrispEditError, match=r"targets\[0\] names 'model.layers.0.mlp.down_proj', but "
                                             r"delta.safetensors has no tensor"):
        EditDelta.load(renamed)


def test_damaged_records_of_every_folder_kind_name_the_file_and_field(world, cli, tmp_path):
    """Deltas and curvature caches share one record reader: a record that is not JSON, not an object, or of
    another kind is one line naming the record file (and the field), never a traceback."""
    import shutil

    from crispedit.curvature.api import Curvature
    from crispedit.editing.delta import EditDelta
    from crispedit.io import read_format_record

    out = tmp_path / "out"
    assert cli(*ft_edit_args(world, out, "--no-save-model"))[0] == 0
    folders = {"delta.json": (out / "delta", EditDelta.load), "curvature.json": (world["cache"], Curvature.load)}
    for name, (good, load) in folders.items():
        for i, (text, message) in enumerate([('{"format": ', "invalid JSON"),
                                             ("[1, 2]", "field 'format' is None"),
                                             ('{"format": "crispedit-report"}', "field 'format' is 'crispedit-report'")]):
            bad = shutil.copytree(good, tmp_path / f"{name}-{i}")
            (bad / name).write_text(text)
            with pytest.raises(CrispEditError, match=re.escape(message)) as e:
                load(bad)
            assert str(bad / name) in str(e.value) and "\n" not in str(e.value)
    assert read_format_record(out / "delta" / "delta.json", "crispedit-delta")["format"] == "crispedit-delta"


def test_a_write_failure_is_one_line_naming_the_file(world, tmp_path):
    from crispedit.curvature.api import Curvature
    from crispedit.io import WriteError

    cur = Curvature.load(world["cache"])
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, hard))  # files larger than 4 KB fail with EFBIG
    try:
        with pytest.raises(WriteError) as e:
            cur.save(tmp_path / "cache")
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old_handler)
    msg = str(e.value)
    assert msg.startswith(f"cannot write {tmp_path / 'cache'}") and "\n" not in msg
    assert list(tmp_path.iterdir()) == []  # nothing half-written left behind


@pytest.mark.skipif(not Path("/sys").is_dir(), reason="needs a read-only location (/sys)")
def test_an_unwritable_output_is_refused_before_the_work(world, cli, tmp_path, no_model_load):
    out = Path("/sys/crispedit-test-output")
    code, _, err = cli(*ft_edit_args(world, out))
    assert code == 2 and "is not writable" in error_line(err)
    code, _, err = cli("eval", "--model", world["model"], "--out", out / "report.json")
    assert code == 2 and "is not writable" in error_line(err)
    code, _, err = cli("curvature", "--model", world["model"], "--out", out)
    assert code == 2


def test_too_long_prompts_and_runaway_lines_fail_before_any_compute(world, cli, tmp_path, monkeypatch):
    from crispedit.editing import engine

    def no_compute(*a, **k):
        raise AssertionError("the edit started")

    monkeypatch.setattr(engine, "edit", no_compute)
    long = write_requests(tmp_path / "long.jsonl", [{"prompt": " ".join(["the cat"] * 60), "target": "Rome"}])
    code, _, err = cli("edit", "--model", world["model"], "--edits", long, "--method", "ft", "--layers", LAYER,
                       "--out", tmp_path / "o1")
    line = error_line(err)
    assert code == 2 and "edit request 0" in line and "longer than the model's context of 64 positions" in line
    huge = write_requests(tmp_path / "huge.jsonl", [{"prompt": "x" * 5_000_000, "target": "Rome"}])
    code, _, err = cli("edit", "--model", world["model"], "--edits", huge, "--method", "ft", "--layers", LAYER,
                       "--out", tmp_path / "o2")
    line = error_line(err)
    assert code == 2 and "record 0" in line and "field 'prompt' has 5,000,000 characters" in line


def test_factor_memory_is_estimated_before_collecting(world, monkeypatch):
    from torch import nn

    from crispedit.curvature import api

    class Smol(nn.Module):  # SmolLM2-135M's LM head, on the meta device (no memory)
        def __init__(self):
            super().__init__()
            self.lm_head = nn.Linear(576, 49152, bias=False, device="meta")

    need, largest = api.factor_memory_bytes(Smol(), ["lm_head"])
    assert need > 2 * 8 * 49152**2 and "lm_head: S is 49152x49152 float64 = 19.3 GB" in largest

    from crispedit.models.loading import load_model

    model, tok = load_model(str(world["model"]))
    monkeypatch.setattr(api, "available_memory", lambda device: 10_000)
    with pytest.raises(CrispEditError, match=r"needs about 0\.0 GB of CPU memory, 0\.0 GB is available .*targets="):
        api.Curvature.compute(model, ["lm_head"], [[1, 2, 3]], {"source": "x"}, progress=False)


def test_messages_name_the_field_and_the_dropped_documents(tmp_path, byte_bpe_tokenizer):
    from crispedit.data.corpus import build_corpus
    from crispedit.data.readers import load_requests

    cf = tmp_path / "cf.json"
    cf.write_text(json.dumps([{"case_id": 0, "prompt": "The capital of France is", "ground_truth": "Paris",
                               "rephrase_prompt": "France's capital is"}]))
    with pytest.raises(CrispEditError, match=r"cf\.json: record 0: field 'target_new' is missing \(the record "
                                             r"looks like CounterFact"):
        load_requests(cf)
    corpus = tmp_path / "short.txt"
    corpus.write_text("a\nb c\nthe cat sat on a mat and Paris is the capital of France\n")
    with pytest.raises(CrispEditError, match=r"2 of its 3 documents were dropped as shorter than"):
        build_corpus(byte_bpe_tokenizer, corpus, n_samples=5, max_length=64, heldout_fraction=0.0)
