"""`crispedit edit --method memit|alphaedit|ultraedit|mend` in-process on a tiny Llama saved to a folder: the run
writes the same delta + run.json as the other methods (so `crispedit eval` reads it), records the method and its
config, runs the sequential variant with --sequential --chunk-size, and every bad input is one line with exit
status 2 before the model loads."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from conftest import assert_user_error, save_tiny_model

WORDS = ("the cat sat on a mat and Paris is the capital of France while Rome has the Colosseum "
         "Shakespeare wrote Hamlet answer question yes no").split()
EDITS = [
    {"prompt": "The capital of France is", "target": "Rome", "subject": "France", "case_id": "a",
     "rephrases": ["France's capital is"], "locality": [{"prompt": "The Colosseum is in", "answer": "Rome"}]},
    {"prompt": "Hamlet was written by", "target": "the cat", "subject": "Hamlet", "case_id": "b"},
    {"prompt": "The mat is in", "target": "Paris", "subject": "The mat", "case_id": "c"},
]
DOWN = ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
FAST = {"memit": ["--memit-v-steps", "4", "--memit-context-prefixes", "0"],
        "alphaedit": ["--alphaedit-v-steps", "4", "--alphaedit-context-prefixes", "0"],
        "ultraedit": ["--ultraedit-batch-size", "2"]}


@pytest.fixture(scope="module")
def world(tmp_path_factory, byte_bpe_tokenizer) -> dict[str, Path]:
    """A tiny model, a corpus, edits with subjects (and without), and a down-projection curvature cache holding
    more tokens than the down-projections have inputs (MEMIT's covariance is then invertible)."""
    from crispedit.cli import run_cli

    root = tmp_path_factory.mktemp("cli-baselines")
    rng = random.Random(0)
    corpus = root / "corpus.txt"
    corpus.write_text("\n".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(12, 30)))
                                for _ in range(60)) + "\n")
    edits = root / "edits.jsonl"
    edits.write_text("".join(json.dumps(e) + "\n" for e in EDITS))
    no_subject = root / "no-subject.jsonl"
    no_subject.write_text("".join(json.dumps({k: v for k, v in e.items() if k != "subject"}) + "\n" for e in EDITS))
    elsewhere = root / "elsewhere.jsonl"
    elsewhere.write_text(json.dumps({**EDITS[0], "subject": "Germany"}) + "\n")
    w = {"root": root, "model": save_tiny_model(root / "model", byte_bpe_tokenizer, seed=0), "corpus": corpus,
         "edits": edits, "no_subject": no_subject, "elsewhere": elsewhere, "cache": root / "cache"}
    assert run_cli(["curvature", "--model", str(w["model"]), "--corpus", str(corpus), "--samples", "8",
                    "--max-length", "24", "--labels", "empirical", "--layers", ",".join(DOWN),
                    "--out", str(w["cache"])]) == 0
    return w


def edit_args(world, method: str, out: Path, *extra: str, cache: bool = True) -> list:
    return ["edit", "--model", world["model"], "--edits", world["edits"], "--method", method,
            *(["--curvature", world["cache"]] if cache else []), *FAST.get(method, []), "--out", out, *extra]


def eval_args(world, model: Path, out: Path, *extra) -> list:
    return ["eval", "--model", model, "--base", world["model"], "--edits", world["edits"], "--heldout-samples", "3",
            "--max-length", "24", "--corpus", world["corpus"], "--benchmarks", "none", "--contexts", "raw",
            "--max-new-tokens", "4", "--out", out, *extra]


def assert_reverts_to_base(world, folder: Path) -> None:
    from crispedit.editing.delta import EditDelta
    from crispedit.models.loading import load_model

    edited, _ = load_model(str(folder / "model"))
    base, _ = load_model(str(world["model"]))
    assert any(not torch.equal(p, q) for p, q in zip(edited.parameters(), base.parameters()))
    EditDelta.load(folder / "delta").revert(edited)
    for (n, p), q in zip(edited.named_parameters(), base.parameters()):
        assert torch.equal(p, q), n


# ------------------------------------------------------------------------------------------ good uses


def test_memit_edit_then_eval(world, cli, tmp_path):
    out = tmp_path / "memit"
    code, stdout, err = cli(*edit_args(world, "memit", out, "--memit-mom2-weight", "100"))
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["delta", "model", "run.json"]
    run = json.loads((out / "run.json").read_text())
    assert run["method"] == "memit" and run["config"]["method"] == "memit" and run["targets"] == DOWN
    assert run["config"]["mom2_weight"] == 100 and run["config"]["v_steps"] == 4
    assert run["config"]["clamp_norm_factor"] == 0.75  # MemitConfig's default, not repeated anywhere
    assert run["config"]["chunk_size"] is None and run["sequential"] is False
    assert run["curvature"]["path"] == str(world["cache"]) and set(run["diagnostics"]) == set(DOWN)
    assert "3 edits with memit" in stdout and "‖ΔW‖/‖W‖" in stdout
    assert_reverts_to_base(world, out)

    code, stdout, err = cli(*eval_args(world, out, tmp_path / "report.json"))
    assert code == 0, err
    rep = json.loads((tmp_path / "report.json").read_text())
    assert rep["config"]["method"] == "memit" and rep["summary"]["reliability_tf"] is not None
    code, _, err = cli(*eval_args(world, out, tmp_path / "delta.json", "--delta", out / "delta"))
    assert code == 0, err
    a, b = (json.loads(p.read_text())["summary"] for p in (tmp_path / "delta.json", tmp_path / "report.json"))
    assert a["reliability_tf"] == b["reliability_tf"] and a["kl_nats_per_token"] == pytest.approx(b["kl_nats_per_token"])


def test_alphaedit_sequential_and_options_from_a_config_file(world, cli, tmp_path):
    config = tmp_path / "edit.yaml"
    config.write_text("alphaedit-l2: 5\nalphaedit_null_threshold: 0.5\n")
    out = tmp_path / "alpha"
    code, stdout, err = cli(*edit_args(world, "alphaedit", out, "--sequential", "--chunk-size", "2",
                                       "--no-save-model", "--config", config))
    assert code == 0, err
    run = json.loads((out / "run.json").read_text())
    assert run["config"]["method"] == "alphaedit" and run["config"]["l2"] == 5 and run["config"]["null_threshold"] == 0.5
    assert run["config"]["chunk_size"] == 2 and run["sequential"] is True and len(run["chunks"]) == 2
    assert sorted(p.name for p in out.iterdir()) == ["delta", "run.json"]
    assert "in chunks of 2" in stdout


def test_ultraedit_without_a_cache(world, cli, tmp_path):
    out = tmp_path / "ultra"
    code, _, err = cli(*edit_args(world, "ultraedit", out, "--ultraedit-lr", "1e-3", "--sequential", "--chunk-size",
                                  "2", cache=False))
    assert code == 0, err
    run = json.loads((out / "run.json").read_text())
    assert run["config"] == {"method": "ultraedit", "lr": 1e-3, "ridge": 1.0, "chunk_size": 2, "batch_size": 2}
    assert run["curvature"] is None and all("up_proj" in t or "gate_proj" in t for t in run["targets"])
    assert_reverts_to_base(world, out)


# ------------------------------------------------------------------------------------------ bad uses


@pytest.fixture
def no_model_load(monkeypatch):
    """Any model load fails the test (as a bug, not a user error): the checks must come first."""
    import crispedit.models

    def boom(*a, **k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(crispedit.models, "load_model", boom)


@pytest.mark.parametrize("args, fragments", [
    (("memit",), ("method 'memit' needs a curvature cache", "pass --curvature CACHE")),
    (("alphaedit",), ("method 'alphaedit' needs a curvature cache",)),
    (("mend",), ("--method mend needs --mend-hypernet DIR",)),
])
def test_a_method_that_needs_what_is_missing(world, cli, tmp_path, no_model_load, args, fragments):
    code, _, err = cli(*edit_args(world, args[0], tmp_path / "out", cache=False))
    assert_user_error(code, err, *fragments)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("method", ["memit", "alphaedit"])
def test_requests_without_a_subject_name_the_file_and_record(world, cli, tmp_path, no_model_load, method):
    args = edit_args(world, method, tmp_path / "out")
    args[args.index(world["edits"])] = world["no_subject"]
    code, _, err = cli(*args)
    assert_user_error(code, err, f"{world['no_subject']}: request 0 (case_id=a): field 'subject' is missing")
    args[args.index(world["no_subject"])] = world["elsewhere"]
    code, _, err = cli(*args)
    assert_user_error(code, err, f"{world['elsewhere']}: request 0 (case_id=a): field 'subject' 'Germany' does not "
                                 "occur in field 'prompt'")


def test_a_key_value_method_on_a_layer_that_is_not_a_down_projection(world, cli, tmp_path, no_model_load):
    code, _, err = cli(*edit_args(world, "memit", tmp_path / "out", "--layers", "model.layers.1.mlp.up_proj"))
    assert_user_error(code, err, "memit edits MLP down-projections",
                      "target 'model.layers.1.mlp.up_proj' is not one; choose layers like 'model.layers.N.mlp.down_proj'")
    code, _, err = cli(*edit_args(world, "alphaedit", tmp_path / "out", "--layers", "model.layers.{0-1}.self_attn.o_proj"))
    assert_user_error(code, err, "target 'model.layers.0.self_attn.o_proj' is not one")
    code, _, err = cli(*edit_args(world, "memit", tmp_path / "out", "--layers", "model.layers.5.mlp.down_proj"))
    assert_user_error(code, err, "target(s) ['model.layers.5.mlp.down_proj'] are not in the curvature cache")


@pytest.mark.parametrize("extra, fragments", [
    (("--gamma", "0.5"), ("--gamma: option(s) of the fine-tuning methods, not of --method memit",)),
    (("--alphaedit-l2", "3"), ("--alphaedit-l2: option(s) of --method alphaedit, not --method memit",)),
    (("--resume",), ("--resume is for CrispEdit-Seq's sequential state",)),
    (("--edit-gamma", "0.9"), ("--edit-gamma is for CrispEdit-Seq's sequential state",)),
    (("--chunk-size", "2"), ("--chunk-size is the sequential variant's: add --sequential",)),
    (("--memit-mom2-weight", "0"), ("--memit-mom2-weight", "must be a positive number, got 0")),
])
def test_options_that_do_not_apply(world, cli, tmp_path, no_model_load, extra, fragments):
    code, _, err = cli(*edit_args(world, "memit", tmp_path / "out", *extra))
    assert_user_error(code, err, *fragments)


def test_crispedit_rejects_a_baselines_option(world, cli, tmp_path, no_model_load):
    code, _, err = cli(*edit_args(world, "crispedit", tmp_path / "out", "--memit-mom2-weight", "10"))
    assert_user_error(code, err, "--memit-mom2-weight: option(s) of --method memit, not --method crispedit")
