"""`crispedit edit`, `eval` and `compare` in-process on a tiny Llama saved to a folder (seconds, no data files):
the README's spellings work end to end, options come from the config dataclasses and config files, every bad
use is one line with a non-zero exit and writes nothing, and internal bugs keep their traceback."""

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
    {"prompt": "The capital of France is", "target": "Rome", "rephrases": ["France's capital is"],
     "locality": [{"prompt": "The Colosseum is in", "answer": "Rome"}]},
    {"prompt": "Hamlet was written by", "target": "the cat", "locality": [{"prompt": "The cat sat on"}]},
    {"prompt": "The mat is in", "target": "Paris"},
]
DOWN = ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
FAST = ["--epochs", "3", "--batch-size", "2"]
EVAL_FAST = ["--heldout-samples", "3", "--max-length", "24", "--corpus", "{corpus}", "--benchmarks", "none",
             "--contexts", "raw", "--max-new-tokens", "4"]


@pytest.fixture(scope="module")
def world(tmp_path_factory, byte_bpe_tokenizer) -> dict[str, Path]:
    """A tiny model (and another one), a corpus, an edits file and a curvature cache built by the CLI."""
    from crispedit.cli import run_cli

    root = tmp_path_factory.mktemp("cli-edit")
    rng = random.Random(0)
    corpus = root / "corpus.txt"
    corpus.write_text("\n".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 20)))
                                for _ in range(60)) + "\n")
    edits = root / "edits.jsonl"
    edits.write_text("".join(json.dumps(e) + "\n" for e in EDITS))
    w = {"root": root, "model": save_tiny_model(root / "model", byte_bpe_tokenizer, seed=0),
         "other": save_tiny_model(root / "other", byte_bpe_tokenizer, seed=1), "corpus": corpus, "edits": edits,
         "cache": root / "cache"}
    assert run_cli(["curvature", "--model", str(w["model"]), "--corpus", str(corpus), "--samples", "6",
                    "--max-length", "24", "--labels", "empirical", "--out", str(w["cache"])]) == 0
    return w


def edit_args(world, out: Path, *extra: str) -> list[str]:
    return ["edit", "--model", str(world["model"]), "--edits", str(world["edits"]), "--curvature",
            str(world["cache"]), *FAST, "--out", str(out), *extra]


def eval_args(world, model: Path | str, out: Path, *extra: str) -> list[str]:
    fast = [a.format(corpus=world["corpus"]) for a in EVAL_FAST]
    return ["eval", "--model", str(model), "--base", str(world["model"]), "--edits", str(world["edits"]), *fast,
            "--out", str(out), *extra]


def listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# ------------------------------------------------------------------------------------------ good uses


def test_edit_eval_compare_end_to_end(world, cli, tmp_path):
    from crispedit.editing.delta import EditDelta
    from crispedit.models.loading import load_model

    crisp, ft = tmp_path / "crisp", tmp_path / "ft"
    code, out, err = cli(*edit_args(world, crisp, "--gamma", "0.5"))
    assert code == 0, err
    assert listing(crisp) == ["delta", "model", "run.json"]
    run = json.loads((crisp / "run.json").read_text())
    assert run["config"]["method"] == "crispedit" and run["config"]["gamma"] == 0.5 and run["targets"] == DOWN
    assert run["config"]["epochs"] == 3 and run["config"]["lr"] == 5e-3  # the EditConfig default
    assert run["config"]["edit_positions"] == "auto" and run["edit_positions"] == "subject-last"
    assert "½ΔᵀGΔ (K-FAC)" in out and "3 edits" in out and "change trained at subject-last positions" in out
    # The delta reverts the saved edited model to the base bit for bit.
    edited, _ = load_model(str(crisp / "model"))
    EditDelta.load(crisp / "delta").revert(edited)
    base, _ = load_model(str(world["model"]))
    for (n, p), q in zip(edited.named_parameters(), base.parameters()):
        assert torch.equal(p, q), n

    code, _, err = cli("edit", "--model", world["model"], "--edits", world["edits"], "--method", "ft", "--layers",
                       DOWN[1], *FAST, "--edit-positions", "subject-last", "--no-save-model", "--out", ft)
    assert code == 0, err
    assert listing(ft) == ["delta", "run.json"] and json.loads((ft / "run.json").read_text())["targets"] == [DOWN[1]]
    # FT keyed on the subject (not its default, `auto`: every token) is told, in one line, that nothing checks its
    # other tokens
    assert "crispedit: warning: method ft with --edit-positions subject-last" in err
    assert "pass --edit-positions auto" in err

    reports = []
    for name, model in (("crisp", crisp), ("base", world["model"])):
        report = tmp_path / f"{name}.json"
        code, out, err = cli(*eval_args(world, model, report, "--label", name))
        assert code == 0, err
        rep = json.loads(report.read_text())
        assert rep["config"]["label"] == name and rep["summary"]["reliability_tf"] is not None
        assert rep["summary"]["perplexity_base"] > 0 and rep["eval_config"]["generated_contexts"] == ["raw"]
        assert "report →" in out
        reports.append(report)
    assert json.loads(reports[0].read_text())["config"]["method"] == "crispedit"  # read from run.json
    assert json.loads(reports[1].read_text())["summary"]["kl_nats_per_token"] == pytest.approx(0.0, abs=1e-6)

    # eval --delta applies a delta to --base instead of loading an edited folder.
    code, _, err = cli(*eval_args(world, crisp, tmp_path / "delta.json", "--delta", crisp / "delta"))
    assert code == 0, err
    a, b = (json.loads(p.read_text())["summary"] for p in (tmp_path / "delta.json", reports[0]))
    assert a["reliability_tf"] == b["reliability_tf"] and a["reliability_gen_raw"] == b["reliability_gen_raw"]
    assert a["kl_nats_per_token"] == pytest.approx(b["kl_nats_per_token"])

    code, out, err = cli("compare", *reports, "--plot", tmp_path / "tradeoff.png", "--out", tmp_path / "table.md")
    assert code == 0, err
    assert "crisp" in out and "base" in out and (tmp_path / "tradeoff.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "table.md").read_text().strip() == out.split("plot →")[0].strip()


def test_edit_options_from_a_config_file_and_aliases(world, cli, tmp_path):
    config = tmp_path / "edit.yaml"
    config.write_text(f"model: {world['model']}\nedits: {world['edits']}\ncurvature: {world['cache']}\n"
                      "method: adam-nscl\nscope: global\nepochs: 2\nbatch_size: 3\nlimit: 2\nno-save-model: true\n"
                      "edit:\n  gamma: 0.7\n")
    out = tmp_path / "run"
    code, _, err = cli("edit", "--config", config, "--lr", "0.01", "--out", out)
    assert code == 0, err
    run = json.loads((out / "run.json").read_text())
    assert {k: run["config"][k] for k in ("method", "scope", "epochs", "batch_size", "gamma", "lr")} == {
        "method": "adam-nscl", "scope": "global", "epochs": 2, "batch_size": 3, "gamma": 0.7, "lr": 0.01}
    assert run["requests"]["n"] == 2 and listing(out) == ["delta", "run.json"]


def test_sequential_edit_and_resume(world, cli, tmp_path):
    out, state = tmp_path / "seq", tmp_path / "state"
    code, _, err = cli(*edit_args(world, out, "--sequential", "--chunk-size", "2", "--state", state,
                                  "--no-save-model"))
    assert code == 0, err
    run = json.loads((out / "run.json").read_text())
    assert run["sequential"] and len(run["chunks"]) == 2 and (state / "state.json").is_file()
    code, _, err = cli(*edit_args(world, tmp_path / "again", "--sequential", "--state", state))
    assert_user_error(code, err, "already exists", "--resume")


# ------------------------------------------------------------------------------------------ bad uses


@pytest.mark.parametrize("extra, fragments", [
    (["--gamma", "1"], ["argument --gamma", "(0, 1)"]),
    (["--method", "rome"], ["argument --method", "invalid choice"]),
    (["--contexts", "raw,wild"], ["argument --contexts", "unknown training context 'wild'"]),
    (["--chat-template"], ["'chat' needs a tokenizer with a chat template"]),
    (["--contexts", "qa", "--prefixes", "-1"], ["argument --prefixes", "non-negative integer"]),
    (["--layers", DOWN[0]], ["--layers model.layers.0.mlp.down_proj selects", "the curvature cache covers"]),
    (["--resume"], ["--resume continues a sequential state"]),
    (["--edit-gamma", "0.9"], ["--edit-gamma thresholds the edits of earlier chunks: add --sequential"]),
    (["--sequential", "--edit-gamma", "0.9", "--method", "adam-nscl"], ["--edit-gamma needs --method crispedit"]),
    (["--sequential", "--edit-gamma", "1"], ["argument --edit-gamma", "(0, 1)"]),
    (["--limit", "0"], ["argument --limit", "positive integer"]),
    (["--format", "mend"], ["unknown edit request format 'mend'"]),
])
def test_edit_bad_uses_give_one_line_and_write_nothing(world, cli, tmp_path, extra, fragments):
    code, _, err = cli(*edit_args(world, tmp_path / "out", *extra))
    assert_user_error(code, err, *fragments)
    assert listing(tmp_path) == []


def test_edit_needs_a_matching_cache_and_a_free_output_folder(world, cli, tmp_path):
    code, _, err = cli("edit", "--model", world["model"], "--edits", world["edits"], "--out", tmp_path / "x")
    assert_user_error(code, err, "--method crispedit needs --curvature CACHE")
    code, _, err = cli(*edit_args(world, tmp_path / "x")[:2], world["other"], *edit_args(world, tmp_path / "x")[3:])
    assert_user_error(code, err, "does not match this model", "weights_sha256", "pass --allow-cache-mismatch")
    assert listing(tmp_path) == []
    code, _, err = cli(*edit_args(world, tmp_path / "x", "--allow-cache-mismatch", "--model", world["other"]))
    assert code == 0, err
    code, _, err = cli(*edit_args(world, tmp_path / "x"))
    assert_user_error(code, err, "exists and is not empty", "--force")
    code, _, err = cli(*edit_args(world, tmp_path / "x", "--force", "--epochs", "1"))
    assert code == 0, err


def test_eval_bad_uses(world, cli, tmp_path):
    code, _, err = cli(*eval_args(world, world["model"], tmp_path / "r.json", "--benchmarks", "mmlu,gsm8k"))
    assert_user_error(code, err, "argument --benchmarks", "'gsm8k'")
    code, _, err = cli(*eval_args(world, world["model"], tmp_path / "r.json", "--delta", tmp_path / "nope"))
    assert_user_error(code, err, "nope")
    code, _, err = cli(*eval_args(world, world["model"], tmp_path / "r.json", "--lm-eval-tasks", "arc_easy"))
    assert_user_error(code, err, "install the `eval` extra")
    code, _, err = cli(*eval_args(world, world["model"], tmp_path / "r.json", "--heldout-samples", "-1"))
    assert_user_error(code, err, "argument --heldout-samples", "non-negative integer")
    assert listing(tmp_path) == []


def test_internal_errors_keep_their_traceback(world, cli, tmp_path, monkeypatch):
    """Only CrispEditError and OSError are user errors: a bug (here a ValueError from inside the edit loop)
    propagates with its traceback instead of becoming a one-line message."""
    from crispedit.cli import run_cli
    from crispedit.editing import engine

    def broken(*args, **kwargs):
        raise ValueError("an internal invariant broke")

    monkeypatch.setattr(engine, "edit", broken)
    with pytest.raises(ValueError, match="internal invariant"):
        run_cli(edit_args(world, tmp_path / "out"))


def test_warnings_are_one_line_and_verbose_shows_stage_logs(world, cli, tmp_path):
    dup = tmp_path / "dup.jsonl"
    dup.write_text("".join(json.dumps(EDITS[0]) + "\n" for _ in range(2)))
    code, _, err = cli("-v", "edit", "--model", world["model"], "--edits", dup, "--curvature", world["cache"],
                       "--epochs", "1", "--no-save-model", "--out", tmp_path / "out")
    assert code == 0, err
    assert "crispedit: warning: dup.jsonl: 1 duplicate (prompt, target) pair(s)" in err
    assert "crispedit: edit (crispedit): 2 request(s), 1 step(s)" in err


@pytest.mark.parametrize("extra,fragments", [
    (("--max-kl", "0"), ("--max-kl", "0")),
    (("--max-kl", "nan"), ("--max-kl", "nan")),
    (("--contexts", "raw,wild"), ("wild",)),
    (("--contexts", "raw,chat"), ("chat template", "--contexts")),
])
def test_recipe_options_bad_values_are_one_line_errors_before_the_model_loads(world, cli, tmp_path, monkeypatch,
                                                                              extra, fragments):
    import crispedit.cli.common as common

    def no_model(*a, **k):
        raise AssertionError("the model was loaded before the bad option was refused")

    monkeypatch.setattr(common, "load_model_from_args", no_model)
    out = tmp_path / "never"
    code, _, err = cli(*edit_args(world, out, *extra))
    assert_user_error(code, err, *fragments)
    assert not out.exists()


def test_kl_budget_through_the_cli_writes_its_certificate(world, cli, tmp_path):
    out = tmp_path / "budget"
    code, _, err = cli(*edit_args(world, out, "--method", "ft", "--lr", "5e-2", "--max-kl", "1e-4",
                                  "--budget-samples", "4"))
    assert code == 0, err
    run = json.loads((out / "run.json").read_text())
    cert = run["kl_budget"]
    assert cert["max_kl"] == 1e-4 and cert["satisfied"] and cert["kl_nats_per_token"] <= 1e-4
    delta = json.loads((out / "delta" / "delta.json").read_text())
    assert delta["kl_budget"]["scale"] == cert["scale"] < 1
