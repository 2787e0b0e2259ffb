"""The CLI, run in-process (`main([...])`, catching SystemExit), on a tiny Llama saved to a folder with a
tiny tokenizer and a tiny .txt corpus: caches are written and read; each bad use gives one line on stderr,
a non-zero exit, and writes nothing."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import assert_user_error, save_tiny_model
from crispedit.curvature.cache import RECORD

WORDS = ("the cat sat on a mat and Paris is the capital of France while Rome has the Colosseum "
         "Shakespeare wrote Hamlet answer question yes no").split()
DOWN = ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
BASE = ["--corpus", "{corpus}", "--max-length", "24", "--samples", "6", "--batch-size", "4"]


@pytest.fixture(scope="module")
def world(tmp_path_factory, byte_bpe_tokenizer) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cli")
    rng = random.Random(0)
    corpus = root / "corpus.txt"
    corpus.write_text("\n".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 20)))
                                for _ in range(40)) + "\n")
    return {"model": save_tiny_model(root / "model", byte_bpe_tokenizer, seed=0),
            "other": save_tiny_model(root / "other", byte_bpe_tokenizer, seed=1),
            "corpus": corpus}


def curvature_args(world, out: Path, *extra: str) -> list[str]:
    base = [a.format(corpus=world["corpus"]) for a in BASE]
    return ["curvature", "--model", str(world["model"]), *base, "--out", str(out), *extra]


def record(path: Path) -> dict:
    return json.loads((path / RECORD).read_text())


def listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


# ------------------------------------------------------------------------------------------ good uses


def test_curvature_writes_a_cache_and_prints_the_summary(world, cli, tmp_path):
    out = tmp_path / "cache"
    code, stdout, err = cli(*curvature_args(world, out))
    assert code == 0, err
    rec = record(out)
    assert [t["name"] for t in rec["targets"]] == DOWN
    assert rec["collection"]["labels"] == "sampled" and rec["collection"]["batch_size"] == 4
    (c,) = rec["corpora"]
    assert c["source"] == str(world["corpus"].resolve()) and c["n_samples"] == 6 and c["max_length"] == 24
    assert c["split"] == "train" and c["heldout_fraction"] == 0.1
    for name in DOWN:
        assert name in stdout
    assert "γ=0.9" in stdout and "A top-1" in stdout and f"wrote {out}" in stdout
    assert "crispedit: error" not in err

    code, info, _ = cli("curvature-info", out)
    assert code == 0 and DOWN[0] in info and "fingerprint" in info
    code, same, _ = cli("curvature", "info", out)
    assert code == 0 and same == info
    code, raw, _ = cli("curvature-info", out, "--json")
    assert code == 0 and json.loads(raw) == rec


def test_options_from_a_config_file_and_flags_override_it(world, cli, tmp_path):
    config = tmp_path / "opts.yaml"
    config.write_text(f"model: {world['model']}\ncorpus: {world['corpus']}\nlabels: empirical\n"
                      "max_length: 20\nsamples: 5\nsink-tokens: 0\nlayers: model.layers.1.mlp.down_proj\n")
    out = tmp_path / "cache"
    code, _, err = cli("curvature", "--config", config, "--samples", "4", "--out", out)
    assert code == 0, err
    rec = record(out)
    assert rec["collection"]["labels"] == "empirical" and rec["collection"]["sink_tokens"] == 0
    assert rec["corpora"][0]["n_samples"] == 4 and rec["corpora"][0]["max_length"] == 20
    assert [t["name"] for t in rec["targets"]] == [DOWN[1]]

    as_json = tmp_path / "opts.json"
    as_json.write_text(json.dumps({"curvature-info": {"json": True}}))
    code, raw, _ = cli("curvature-info", out, "--config", as_json)
    assert code == 0 and json.loads(raw) == rec


def parse_targets_table(out: str) -> dict[str, tuple[bool, str, str]]:
    """{layer: (marked, kind, shape)} from `crispedit targets` output."""
    rows = {}
    for line in out.splitlines():
        marked = line.startswith("* ")
        cells = line[2:].split()
        if len(cells) == 4 and cells[1] in ("linear", "conv1d"):
            rows[cells[0]] = (marked, cells[1], cells[2])
    return rows


def test_targets_lists_layers_and_marks_targets(world, cli):
    code, out, _ = cli("targets", world["model"])
    assert code == 0
    rows = parse_targets_table(out)
    assert len(rows) == 15  # 7 Linear layers per block x 2 + lm_head
    assert [n for n, (marked, _, _) in rows.items() if marked] == DOWN
    assert rows[DOWN[0]] == (True, "linear", "32x64")
    assert rows["model.layers.0.self_attn.k_proj"] == (False, "linear", "16x32")
    assert rows["lm_head"][2].endswith("x32")
    code, out, _ = cli("targets", "--model", world["model"], "--layers", "re:.*self_attn\\.(q|k)_proj")
    assert code == 0
    marked = [n for n, (m, _, _) in parse_targets_table(out).items() if m]
    assert marked == [f"model.layers.{i}.self_attn.{p}_proj" for i in (0, 1) for p in ("q", "k")]
    code, _, err = cli("targets", world["model"], "--layers", "model.layers.{0-5}.mlp.down_proj")
    assert_user_error(code, err, "model.layers.2.mlp.down_proj")


def test_merge_adds_caches(world, cli, tmp_path):
    a, b, merged = tmp_path / "a", tmp_path / "b", tmp_path / "ab"
    assert cli(*curvature_args(world, a, "--labels", "empirical"))[0] == 0
    assert cli(*curvature_args(world, b, "--labels", "empirical", "--seed", "1"))[0] == 0
    code, out, err = cli("curvature", "merge", a, b, "--out", merged)
    assert code == 0, err
    ra, rb, rm = record(a), record(b), record(merged)
    assert rm["n_tokens"] == ra["n_tokens"] + rb["n_tokens"]
    assert rm["corpora"] == ra["corpora"] + rb["corpora"]
    assert "merged 2 caches" in out


def test_extend_adds_only_sequences_the_cache_has_not_seen(world, cli, tmp_path, byte_bpe_tokenizer):
    from crispedit.data.corpus import build_corpus

    available = build_corpus(byte_bpe_tokenizer, world["corpus"], None, max_length=24).n_samples
    out = tmp_path / "cache"
    assert cli(*curvature_args(world, out))[0] == 0
    code, stdout, err = cli("curvature", "--model", world["model"], "--out", out, "--extend",
                            "--samples", str(available - 6))
    assert code == 0, err
    rec = record(out)
    assert len(rec["corpora"]) == 2 and rec["corpora"][1]["excluded_previous"]
    assert rec["corpora"][1]["seed"] == 1 and rec["corpora"][1]["max_length"] == 24  # taken from the cache
    assert rec["corpora"][1]["n_excluded"] == 6
    # Every chunk is now in the cache: one more is more than the corpus has left.
    before = snapshot(out)
    code, _, err = cli("curvature", "--model", world["model"], "--out", out, "--extend", "--samples", "1")
    assert_user_error(code, err, "only 0 chunks")
    assert snapshot(out) == before


def test_python_dash_m_runs_the_cli(world, tmp_path):
    done = subprocess.run([sys.executable, "-m", "crispedit", "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "curvature" in done.stdout and "targets" in done.stdout
    done = subprocess.run([sys.executable, "-m", "crispedit", "curvature", "--model", str(world["model"]),
                           "--samples", "0", "--out", str(tmp_path / "c")], capture_output=True, text=True, timeout=120)
    assert_user_error(done.returncode, done.stderr, "--samples", "positive integer")
    assert not (tmp_path / "c").exists()


# ------------------------------------------------------------------------------------------ bad uses


@pytest.mark.parametrize("extra, fragments", [
    (["--samples", "0"], ["argument --samples", "positive integer"]),
    (["--max-length", "-3"], ["argument --max-length"]),
    (["--heldout-fraction", "1.5"], ["argument --heldout-fraction", "[0, 1)"]),
    (["--sink-energy", "0"], ["argument --sink-energy", "(0, 1]"]),
    (["--mc-samples", "two"], ["argument --mc-samples", "'two'"]),
    (["--labels", "exactish"], ["argument --labels", "invalid choice"]),
    (["--dtype", "float8"], ["argument --dtype"]),
    (["--bogus"], ["unrecognized arguments: --bogus"]),
    (["--corpus", "no-such-corpus.txt"], ["corpus not found", "no-such-corpus.txt"]),
    (["--layers", "model.layers.0.mlp.dwn_proj"], ["no module named 'model.layers.0.mlp.dwn_proj'",
                                                   "model.layers.0.mlp.down_proj"]),
    (["--layers", "model.layers.0.mlp"], ["not a Linear/Conv1D layer"]),
    (["--samples", "5000"], ["5000 asked"]),
    (["--device", "cuda:7"], ["cuda"]),
])
def test_bad_uses_give_one_line_and_write_nothing(world, cli, tmp_path, extra, fragments):
    out = tmp_path / "cache"
    code, stdout, err = cli(*curvature_args(world, out, *extra))
    assert_user_error(code, err, *fragments)
    assert listing(tmp_path) == []


def test_missing_required_options_and_bad_config(world, cli, tmp_path):
    code, _, err = cli("curvature", "--model", world["model"])
    assert_user_error(code, err, "--out")
    bad = tmp_path / "bad.yaml"
    bad.write_text("heldout_fraction: 2\n")
    code, _, err = cli(*curvature_args(world, tmp_path / "c", "--config", str(bad)))
    assert_user_error(code, err, "bad.yaml", "heldout_fraction", "[0, 1)")
    bad.write_text("samplez: 3\n")
    code, _, err = cli(*curvature_args(world, tmp_path / "c", "--config", str(bad)))
    assert_user_error(code, err, "unknown option 'samplez'")
    bad.write_text("force: 3\n")
    code, _, err = cli(*curvature_args(world, tmp_path / "c", "--config", str(bad)))
    assert_user_error(code, err, "option 'force'", "expected true or false")
    bad.write_text("- a list\n")
    code, _, err = cli(*curvature_args(world, tmp_path / "c", "--config", str(bad)))
    assert_user_error(code, err, "expected a mapping")
    code, _, err = cli(*curvature_args(world, tmp_path / "c", "--config", str(tmp_path / "nope.yaml")))
    assert_user_error(code, err, "config file not found")
    assert listing(tmp_path) == ["bad.yaml"]


def test_existing_outputs_are_protected(world, cli, tmp_path):
    out = tmp_path / "cache"
    assert cli(*curvature_args(world, out))[0] == 0
    before = snapshot(out)
    code, _, err = cli(*curvature_args(world, out, "--seed", "3"))
    assert_user_error(code, err, "already exists", "--force")
    assert snapshot(out) == before
    code, _, err = cli(*curvature_args(world, out, "--seed", "3", "--force"))
    assert code == 0, err
    assert record(out)["corpora"][0]["seed"] == 3
    forced = tmp_path / "force.yaml"
    forced.write_text("force: true\nseed: 4\n")
    code, _, err = cli(*curvature_args(world, out, "--config", str(forced)))
    assert code == 0, err
    assert record(out)["corpora"][0]["seed"] == 4
    forced.unlink()

    folder = tmp_path / "results"
    folder.mkdir()
    (folder / "keep.txt").write_text("mine")
    code, _, err = cli(*curvature_args(world, folder, "--force"))
    assert_user_error(code, err, "not a crispedit curvature cache")
    assert listing(folder) == ["keep.txt"]
    assert listing(tmp_path) == ["cache", "results"]


def test_extend_refuses_a_cache_of_another_model_or_settings(world, cli, tmp_path):
    out = tmp_path / "cache"
    assert cli(*curvature_args(world, out))[0] == 0
    before = snapshot(out)
    extend = ["curvature", "--out", str(out), "--extend", "--samples", "2"]
    code, _, err = cli(*extend, "--model", world["other"])
    assert_user_error(code, err, "cannot extend", "weights_sha256")
    code, _, err = cli(*extend, "--model", world["model"], "--labels", "empirical")
    assert_user_error(code, err, "--labels empirical", "labels='sampled'")
    code, _, err = cli(*extend, "--model", world["model"], "--layers", DOWN[0])
    assert_user_error(code, err, "--layers")
    code, _, err = cli(*extend, "--model", world["model"], "--heldout-fraction", "0.3")
    assert_user_error(code, err, "held-out")
    code, _, err = cli("curvature", "--model", world["model"], "--out", tmp_path / "none", "--extend")
    assert_user_error(code, err, "does not exist")
    assert snapshot(out) == before and listing(tmp_path) == ["cache"]


def test_merge_refuses_caches_of_different_models(world, cli, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    assert cli(*curvature_args(world, a))[0] == 0
    args_b = curvature_args(world, b)
    args_b[args_b.index("--model") + 1] = str(world["other"])
    assert cli(*args_b)[0] == 0
    code, _, err = cli("curvature-merge", a, b, "--out", tmp_path / "ab")
    assert_user_error(code, err, "cannot merge", "weights_sha256")
    code, _, err = cli("curvature-merge", a, "--out", tmp_path / "ab")
    assert_user_error(code, err, "at least two")
    code, _, err = cli("curvature-merge", a, tmp_path / "missing", "--out", tmp_path / "ab")
    assert_user_error(code, err, "does not exist")
    assert listing(tmp_path) == ["a", "b"]


def test_debug_shows_the_traceback(world, cli, tmp_path):
    code, _, err = cli("--debug", *curvature_args(world, tmp_path / "c", "--layers", "nope"))
    assert code == 2 and "Traceback" in err and err.rstrip().splitlines()[-1].startswith("crispedit: error:")
    assert listing(tmp_path) == []
