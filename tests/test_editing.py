"""Editing engine on tiny models: convergence, subspace membership, curvature cost, deltas, sequential state."""

import dataclasses
from pathlib import Path

import pytest
import torch

from crispedit.curvature.api import Curvature, CurvatureConfig
from crispedit.data.records import EditRequest
from crispedit.editing.config import EditConfig
from crispedit.editing.delta import EditDelta
from crispedit.editing.engine import edit
from crispedit.errors import CrispEditError, DivergenceError
from crispedit.models.targets import weight_matrix

TARGETS = ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
REQUESTS = [
    EditRequest("The capital of France is", "Rome"),
    EditRequest("The Eiffel Tower is located in", "Berlin"),
    EditRequest("The mother tongue of Danielle Darrieux is", "German"),
    EditRequest("The Colosseum is in the city of", "Paris"),
]
CAPABILITY = [
    "Please answer the question: Who wrote Hamlet? Shakespeare.", "The language of Toko Yasuda is English.",
    "Planetary days will become shorter.", "The answer is yes, not no.", "Reply: yes. Reply: no.",
]


@pytest.fixture
def setup(byte_bpe_tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = byte_bpe_tokenizer
    torch.manual_seed(0)
    # A wide init so that two down-projections can fit the edits (std 0.02 leaves logits nearly flat).
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=48, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      eos_token_id=0, pad_token_id=1, bos_token_id=None, initializer_range=0.3)
    model = LlamaForCausalLM(cfg).eval()
    seqs = [tok(t)["input_ids"] for t in CAPABILITY] * 4
    cur = Curvature.compute(model, TARGETS, seqs, {"source": "test"},
                            CurvatureConfig(labels="sampled", mc_samples=4, sink_tokens=0), pad_id=1, progress=False)
    return model, tok, cur


def weights(model):
    return {n: weight_matrix(model.get_submodule(n)).clone() for n in TARGETS}


def run(model, tok, cur, **kw):
    cfg = EditConfig(**{"lr": 2e-2, "epochs": 60, "batch_size": 4, "early_stop_loss": 0.05, **kw})
    return edit(model, tok, REQUESTS, TARGETS, cfg, curvature=cur, progress=False)


def test_crispedit_converges_and_stays_in_subspace_while_ft_does_not(setup):
    model, tok, cur = setup
    base = weights(model)
    res = run(model, tok, cur, method="crispedit", gamma=0.9)
    assert res.stopped == "early_stop" and res.epoch_losses[-1] < 0.05
    projs = cur.projectors(0.9, kind="kfac", dtype=torch.float64)
    for n in TARGETS:
        d = res.delta.deltas[n].double()
        assert float((projs[n](d) - d).norm() / d.norm()) < 1e-5  # projecting again changes nothing
        assert res.diagnostics[n]["removed_energy_fraction"] < 1e-9
    res.delta.revert(model)
    assert all(torch.equal(weights(model)[n], base[n]) for n in TARGETS)

    ft = run(model, tok, cur, method="ft", gamma=0.9)
    assert ft.stopped == "early_stop"
    for n in TARGETS:
        assert ft.diagnostics[n]["removed_energy_fraction"] > 0.05
    # At equal edit loss (both stopped below the same threshold) CrispEdit's predicted capability cost is far smaller.
    q_crisp = sum(res.diagnostics[n]["kfac_quadratic_form"] for n in TARGETS)
    q_ft = sum(ft.diagnostics[n]["kfac_quadratic_form"] for n in TARGETS)
    assert q_crisp < 0.2 * q_ft


def test_authors_projection_mode_leaks_out_of_the_subspace(setup):
    model, tok, cur = setup
    leaks = {}
    for mode in ("eigen", "update", "grad"):
        res = run(model, tok, cur, method="crispedit", gamma=0.9, projection_mode=mode, epochs=5)
        leaks[mode] = max(res.diagnostics[n]["removed_energy_fraction"] for n in TARGETS)
        res.delta.revert(model)
    assert leaks["eigen"] < 1e-9 and leaks["update"] < 1e-9
    assert leaks["grad"] > 1e-4


def test_adam_nscl_keeps_activation_nullspace(setup):
    model, tok, cur = setup
    res = run(model, tok, cur, method="adam-nscl", gamma=0.9, epochs=5)
    from crispedit.curvature.api import nscl_keep_columns

    for n in TARGETS:
        e = cur.eigen[n]
        removed_cols = e.U_A[:, ~nscl_keep_columns(e, 0.9)].float()
        assert float((res.delta.deltas[n] @ removed_cols).norm()) < 1e-5 * float(res.delta.deltas[n].norm())


def test_delta_apply_revert_bit_exact_and_roundtrip(setup, tmp_path):
    model, tok, cur = setup
    base = weights(model)
    res = run(model, tok, cur, method="crispedit", gamma=0.9, epochs=3)
    edited = weights(model)
    res.delta.save(tmp_path / "d")
    loaded = EditDelta.load(tmp_path / "d")
    loaded.revert(model)
    assert all(torch.equal(weights(model)[n], base[n]) for n in TARGETS)
    with pytest.raises(CrispEditError, match="edited weights"):
        loaded.revert(model)  # already reverted: refused, nothing changes
    loaded.apply(model)
    assert all(torch.equal(weights(model)[n], edited[n]) for n in TARGETS)
    with pytest.raises(CrispEditError, match="base"):
        loaded.apply(model)  # applying twice is refused
    loaded.revert(model)
    all_params = {k: v.clone() for k, v in model.state_dict().items()}
    loaded.apply(model)
    loaded.revert(model)
    assert all(torch.equal(v, all_params[k]) for k, v in model.state_dict().items())
    assert loaded.record["requests_sha256"] and loaded.record["config"]["gamma"] == 0.9
    assert len(loaded.record["step_losses"]) == loaded.record["steps"]


def test_divergence_restores_weights_and_names_the_step(setup):
    model, tok, cur = setup
    base = weights(model)
    with pytest.raises(DivergenceError, match="step 1"):
        run(model, tok, cur, method="ft", lr=float("inf"), epochs=2)
    assert all(torch.equal(weights(model)[n], base[n]) for n in TARGETS)


def test_curvature_targets_must_match(setup):
    model, tok, cur = setup
    with pytest.raises(CrispEditError, match="curvature cache covers"):
        edit(model, tok, REQUESTS, TARGETS[:1], EditConfig(), curvature=cur, progress=False)


# ---------------------------------------------------------------- sequential

def test_sequential_chunk_statistics_add_up_to_union(setup):
    from crispedit.curvature.collect import CollectConfig, collect_lm_stats
    from crispedit.editing.contexts import training_sequences

    model, tok, cur = setup
    model.double()  # float64 so that batch composition cannot change rounding
    seqs = [s.pair.input_ids for s in training_sequences(tok, REQUESTS)]
    cfg = CollectConfig(labels="empirical", sink_tokens=0)
    union = collect_lm_stats(model, seqs, TARGETS, cfg, progress=False)
    parts = collect_lm_stats(model, seqs[:2], TARGETS, cfg, progress=False)
    parts.add_(collect_lm_stats(model, seqs[2:], TARGETS, cfg, progress=False))
    acc = cur.stats.clone().add_(parts)
    ref = cur.stats.clone().add_(union)
    for n in TARGETS:
        assert acc[n].n == ref[n].n
        assert torch.allclose(acc[n].A, ref[n].A, rtol=1e-10) and torch.allclose(acc[n].S, ref[n].S, rtol=1e-9)


def test_sequential_resume_equals_uninterrupted_run(setup, tmp_path):
    from crispedit.editing.sequential import SequentialEditor

    model, tok, cur = setup
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = EditConfig(lr=2e-2, epochs=20, batch_size=2, early_stop_loss=0.05, gamma=0.9)
    chunks = [REQUESTS[:2], REQUESTS[2:]]

    ed = SequentialEditor.create(tmp_path / "a", model, cur, cfg)
    for c in chunks:
        ed.edit_chunk(model, tok, c, progress=False)
    straight = weights(model)
    straight_delta = ed.cumulative_delta(model)
    n_tok = ed.curvature.stats[TARGETS[0]].n
    assert n_tok > cur.stats[TARGETS[0]].n  # edits were added as constraints

    model.load_state_dict(base_state)
    ed1 = SequentialEditor.create(tmp_path / "b", model, cur, cfg)
    ed1.edit_chunk(model, tok, chunks[0], progress=False)
    del ed1
    model.load_state_dict(base_state)  # a later process starts from the base model
    ed2 = SequentialEditor.open(tmp_path / "b", model)
    ed2.edit_chunk(model, tok, chunks[1], progress=False)
    resumed = weights(model)
    for n in TARGETS:
        assert torch.equal(resumed[n], straight[n])
    assert ed2.curvature.stats[TARGETS[0]].n == n_tok
    # The cumulative delta applies to the base model and reproduces the edited weights.
    model.load_state_dict(base_state)
    straight_delta.apply(model)
    for n in TARGETS:
        assert torch.allclose(weights(model)[n], straight[n], atol=1e-6)
    # A state refuses a model that is not its base.
    with pytest.raises(CrispEditError, match="base weights"):
        SequentialEditor.open(tmp_path / "b", model)


def test_run_edit_sequential_writes_cumulative_delta_with_whole_edit_diagnostics(setup, tmp_path):
    from crispedit.editing.engine import diagnostics
    from crispedit.editing.run import EditJob, run_edit

    model, tok, cur = setup
    base = weights(model)
    cur.save(tmp_path / "cache")
    cfg = EditConfig(lr=2e-2, epochs=10, batch_size=2, early_stop_loss=0.05, gamma=0.9)
    job = EditJob(REQUESTS, cfg, curvature_path=str(tmp_path / "cache"), sequential=True, chunk_size=2,
                  save_model=False)
    run_edit(model, tok, job, tmp_path / "out", progress=False)
    delta = EditDelta.load(tmp_path / "out" / "delta")
    rec = delta.record
    assert len(rec["chunks"]) == 2 and rec["steps"] == sum(c["steps"] for c in rec["chunks"]) > 0
    assert rec["final_loss"] == rec["chunks"][-1]["final_loss"] and rec["seconds"] > 0
    # Diagnostics describe the cumulative edit against the starting capability curvature, not the last chunk.
    expected = diagnostics(delta.deltas, cur, cfg)
    for n in TARGETS:
        assert rec["diagnostics"][n]["kfac_quadratic_form"] == pytest.approx(expected[n]["kfac_quadratic_form"])
        assert torch.allclose(weights(model)[n], base[n] + delta.deltas[n].to(base[n].dtype), atol=1e-6)


def test_sequential_edit_weight_counts_edit_tokens_k_times(setup, tmp_path):
    from crispedit.editing.sequential import SequentialEditor

    model, tok, cur = setup
    # Scaling statistics by k is the same as merging k copies of them.
    one = cur.stats[TARGETS[0]]
    three = one.clone().add_(one).add_(one)
    scaled = one.clone().scaled_(3)
    assert scaled.n == three.n and torch.allclose(scaled.A, three.A) and torch.allclose(scaled.S, three.S)
    with pytest.raises(ValueError, match="positive integer"):
        one.clone().scaled_(0)
    cfg = EditConfig(lr=2e-2, epochs=3, batch_size=2, gamma=0.9)
    grown = {}
    for w in (1, 4):
        base_state = {k: v.clone() for k, v in model.state_dict().items()}
        ed = SequentialEditor.create(tmp_path / f"w{w}", model, cur, cfg, edit_weight=w)
        ed.edit_chunk(model, tok, REQUESTS[:2], progress=False)
        grown[w] = ed.curvature.stats[TARGETS[0]].n - cur.stats[TARGETS[0]].n
        assert ed.state["chunks"][0]["edit_weight"] == w
        model.load_state_dict(base_state)  # a resumed state starts from the base model
        assert SequentialEditor.open(tmp_path / f"w{w}", model).edit_weight == w
        model.load_state_dict(base_state)
    assert grown[4] == 4 * grown[1] > 0
    with pytest.raises(CrispEditError, match="positive integer"):
        SequentialEditor.create(tmp_path / "bad", model, cur, cfg, edit_weight=0)


def test_sequential_edit_position_statistics_count_only_where_the_edit_acted(setup, tmp_path):
    """edit_statistics="edit-positions": a chunk adds the statistics of its training sequences at the subject's
    last token only (one position per sequence, the same sums `collect_lm_stats` gives for those positions),
    the state and the chunk log say so, and a resumed state keeps the choice."""
    from crispedit.curvature.collect import collect_lm_stats
    from crispedit.editing.contexts import training_sequences
    from crispedit.editing.engine import training_positions
    from crispedit.editing.sequential import SequentialEditor

    model, tok, cur = setup
    subjects = ["France", "The Eiffel Tower", "Danielle Darrieux", "The Colosseum"]
    reqs = [dataclasses.replace(r, subject=s) for r, s in zip(REQUESTS, subjects)][:2]
    cfg = EditConfig(lr=2e-2, epochs=3, batch_size=2, gamma=0.9, contexts=("raw",), prefixes=0)
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    ed = SequentialEditor.create(tmp_path / "keys", model, cur, cfg, edit_statistics="edit-positions")
    ed.edit_chunk(model, tok, reqs, progress=False)
    assert ed.state["edit_statistics"] == "edit-positions"
    assert ed.state["chunks"][0]["edit_statistics"] == "edit-positions" and ed.state["chunks"][0]["edit_tokens"] == 2
    train = training_sequences(tok, reqs, ("raw",))
    pos = training_positions(train, "subject-last")
    assert [len(p) for p in pos] == [1, 1]
    ccfg = dataclasses.replace(cur.config, seed=cur.config.seed + 7919)
    want = collect_lm_stats(model, [t.pair.input_ids for t in train], TARGETS, ccfg, pad_id=1, positions=pos)
    for n in TARGETS:
        grown = ed.curvature.stats[n].A - cur.stats[n].A
        assert ed.curvature.stats[n].n - cur.stats[n].n == 2
        assert torch.allclose(grown, want[n].A, rtol=1e-9, atol=1e-9 * float(want[n].A.abs().max()))
    model.load_state_dict(base_state)
    assert SequentialEditor.open(tmp_path / "keys", model).edit_statistics == "edit-positions"
    model.load_state_dict(base_state)
    with pytest.raises(CrispEditError, match="edit_statistics"):
        SequentialEditor.create(tmp_path / "bad", model, cur, cfg, edit_statistics="tokens")


def test_subject_positions_train_the_change_only_through_the_subject(setup, caplog, monkeypatch):
    """edit_positions="subject": the change acts at the subject's tokens only while training. The last layer's
    MLP output at the subject's tokens reaches no target position (no attention above it), so that layer's delta
    stays exactly zero while the layer below, whose output later attention reads, carries the edit. A request
    without a subject found in its prompt trains at every token (and says so). `auto` resolves by method and size."""
    model, tok, cur = setup
    subjects = ["France", "The Eiffel Tower", "Danielle Darrieux", "The Colosseum"]
    reqs = [dataclasses.replace(r, subject=s) for r, s in zip(REQUESTS, subjects)]
    cfg = EditConfig(method="ft", lr=2e-2, epochs=20, batch_size=4, contexts=("raw",), prefixes=0,
                     edit_positions="subject")
    res = edit(model, tok, reqs, TARGETS, cfg, curvature=None, progress=False)
    assert res.delta.record["edit_positions"] == {"where": "subject", "sequences_with_subject": 4, "sequences": 4}
    assert torch.count_nonzero(res.delta.deltas[TARGETS[1]]) == 0
    assert res.delta.deltas[TARGETS[0]].norm() > 0 and res.epoch_losses[-1] < 0.75 * res.epoch_losses[0]
    res.delta.revert(model)

    reqs[0] = dataclasses.replace(reqs[0], subject="Germany")  # not in its prompt
    with caplog.at_level("WARNING", logger="crispedit.editing.engine"):
        res = edit(model, tok, reqs, TARGETS, dataclasses.replace(cfg, epochs=2), curvature=None, progress=False)
    assert "not found in 1 of 4" in caplog.text
    assert res.delta.deltas[TARGETS[1]].norm() > 0
    res.delta.revert(model)

    # `auto` (the default) resolves by method: FT, which no projection checks at the other tokens, trains everywhere
    res = edit(model, tok, reqs, TARGETS, dataclasses.replace(cfg, epochs=2, edit_positions="auto"), curvature=None,
               progress=False)
    assert res.delta.record["edit_positions"] == {"where": "all"} and res.delta.deltas[TARGETS[1]].norm() > 0
    res.delta.revert(model)

    # ... and by size for CrispEdit: keyed on the subject below AUTO_ALL_FROM requests, every token from there on
    auto = dataclasses.replace(cfg, method="crispedit", epochs=2, edit_positions="auto")
    res = edit(model, tok, reqs[1:], TARGETS, auto, curvature=cur, progress=False)
    assert res.delta.record["edit_positions"]["where"] == "subject-last"
    assert torch.count_nonzero(res.delta.deltas[TARGETS[1]]) == 0
    res.delta.revert(model)
    monkeypatch.setattr("crispedit.config.AUTO_ALL_FROM", len(reqs) - 1)
    res = edit(model, tok, reqs[1:], TARGETS, auto, curvature=cur, progress=False)
    assert res.delta.record["edit_positions"] == {"where": "all"} and res.delta.deltas[TARGETS[1]].norm() > 0
    res.delta.revert(model)


def test_sequential_resolves_auto_positions_once_for_its_chunk_size(setup, tmp_path, monkeypatch):
    """A sequential run's short last chunk trains where its full chunks do (and where the run's record says):
    `auto` is resolved for the state's chunk size, not for each chunk's own length."""
    from crispedit.editing.sequential import SequentialEditor

    model, tok, cur = setup
    monkeypatch.setattr("crispedit.config.AUTO_ALL_FROM", 3)  # chunks of 3 train at every token
    subjects = ["France", "The Eiffel Tower", "Danielle Darrieux", "The Colosseum"]
    reqs = [dataclasses.replace(r, subject=s) for r, s in zip(REQUESTS, subjects)]
    cfg = EditConfig(lr=2e-2, epochs=2, batch_size=2, gamma=0.9, edit_positions="auto")
    ed = SequentialEditor.create(tmp_path / "s", model, cur, cfg, chunk_size=3)
    full = ed.edit_chunk(model, tok, reqs[:3], progress=False)
    last = ed.edit_chunk(model, tok, reqs[3:4], progress=False)  # one request: alone it would be subject-last
    assert full.delta.record["edit_positions"] == {"where": "all"}
    assert last.delta.record["edit_positions"] == {"where": "all"}
    assert last.delta.deltas[TARGETS[1]].norm() > 0  # the last layer moves only when trained past the subject


def test_auto_edit_positions_follow_the_method_and_the_number_of_requests():
    """`auto` keys a projecting method's change on the subject's last token below AUTO_ALL_FROM requests at once and
    trains it at every token from there on; an unconstrained one always trains at every token; an explicit choice
    is kept for every method and size."""
    from crispedit.config import AUTO_ALL_FROM

    for method in ("crispedit", "adam-nscl"):
        assert EditConfig(method=method).positions_for(1) == "subject-last"
        assert EditConfig(method=method).positions_for(AUTO_ALL_FROM - 1) == "subject-last"
        assert EditConfig(method=method).positions_for(AUTO_ALL_FROM) == "all"
    for method in ("ft", "lora", "locbf-ft"):
        assert EditConfig(method=method).positions_for(1) == "all"
    for method in ("crispedit", "adam-nscl", "ft", "lora", "locbf-ft"):
        for where in ("all", "subject", "subject-last"):
            for n in (1, AUTO_ALL_FROM, 10 * AUTO_ALL_FROM):
                assert EditConfig(method=method, edit_positions=where).positions_for(n) == where


def test_sequential_separate_thresholds_keep_capability_and_edits_apart(setup, tmp_path):
    """edit_gamma: the capability statistics stay as they were, the edits' accumulate unweighted beside them, each
    chunk is projected with both thresholds (a subset of what the capability alone keeps, in the merged basis), and
    a resumed state ends bit for bit where an uninterrupted one does."""
    from crispedit.editing.sequential import SequentialEditor

    model, tok, cur = setup
    cfg = EditConfig(lr=2e-2, epochs=4, batch_size=2, gamma=0.9)
    chunks = [REQUESTS[:2], REQUESTS[2:]]
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    ed = SequentialEditor.create(tmp_path / "a", model, cur, cfg, edit_weight=4, edit_gamma=0.8)
    ed.edit_chunk(model, tok, chunks[0], progress=False)
    n = TARGETS[0]
    grown = ed.curvature.stats[n].n - cur.stats[n].n
    assert ed.capability.stats[n].n == cur.stats[n].n and torch.equal(ed.capability.stats[n].A, cur.stats[n].A)
    assert ed.edits.stats[n].n * 4 == grown > 0 and ed.state["chunks"][0]["edit_gamma"] == 0.8
    joint = ed.curvature.joint_projectors([(cur.stats, 0.9), (ed.edits.stats, 0.8)])
    alone = ed.curvature.joint_projectors([(cur.stats, 0.9)])
    assert bool((joint[n].keep <= alone[n].keep).all()) and joint[n].keep.sum() < alone[n].keep.sum()
    ed.edit_chunk(model, tok, chunks[1], progress=False)
    straight = weights(model)

    model.load_state_dict(base_state)
    ed1 = SequentialEditor.create(tmp_path / "b", model, cur, cfg, edit_weight=4, edit_gamma=0.8)
    ed1.edit_chunk(model, tok, chunks[0], progress=False)
    model.load_state_dict(base_state)
    ed2 = SequentialEditor.open(tmp_path / "b", model)
    assert ed2.edit_gamma == 0.8 and torch.equal(ed2.edits.stats[n].A, ed1.edits.stats[n].A)
    ed2.edit_chunk(model, tok, chunks[1], progress=False)
    for t in TARGETS:
        assert torch.equal(weights(model)[t], straight[t])
    model.load_state_dict(base_state)
    with pytest.raises(CrispEditError, match="edit_gamma"):
        SequentialEditor.create(tmp_path / "bad", model, cur, cfg, edit_gamma=1.0)
    with pytest.raises(CrispEditError, match="edit_gamma"):
        SequentialEditor.create(tmp_path / "bad", model, cur, dataclasses.replace(cfg, method="ft"), edit_gamma=0.9)


def test_results_script_sequential_state_resumes_after_its_last_chunk(setup, tmp_path):
    """scripts/wild_ablation.py with a persistent "state": a run stopped after its first chunk and started again
    (from the base model, as a new process would) ends at the weights of an uninterrupted run."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("wild_ablation", Path(__file__).resolve().parents[1]
                                                  / "scripts" / "wild_ablation.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    model, tok, cur = setup
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = EditConfig(lr=2e-2, epochs=20, batch_size=2, early_stop_loss=0.05, gamma=0.9)
    reqs = REQUESTS[:4]
    res, delta, log = script.edit_sequentially(model, tok, reqs, TARGETS, cfg, cur, 2, 1, state=tmp_path / "a")
    straight = weights(model)
    assert [c["n_edits"] for c in log] == [2, 2] and res.steps == sum(c["steps"] for c in log)

    model.load_state_dict(base_state)
    script.edit_sequentially(model, tok, reqs[:2], TARGETS, cfg, cur, 2, 1, state=tmp_path / "b")  # "stopped"
    model.load_state_dict(base_state)
    res2, delta2, log2 = script.edit_sequentially(model, tok, reqs, TARGETS, cfg, cur, 2, 1, state=tmp_path / "b")
    assert len(log2) == 2 and log2[0] == log[0] | {"seconds": log2[0]["seconds"]}
    for n in TARGETS:
        assert torch.equal(weights(model)[n], straight[n])
