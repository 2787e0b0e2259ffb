"""Distributed K-FAC collection: two gloo processes on 127.0.0.1 must reproduce the single-process sums."""

from __future__ import annotations

import json
import os
import random
import socket
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from crispedit.curvature.collect import CollectConfig, collect_lm_stats
from crispedit.curvature.distributed import (
    DistContext,
    all_reduce_stats,
    collect_lm_stats_distributed,
    init_distributed,
    is_main,
    rank_config,
    shutdown,
)
from crispedit.curvature.stats import KFACStats, LayerStats
from crispedit.errors import CrispEditError

VOCAB = 50
TARGETS = ["model.layers.0.mlp.down_proj", "model.layers.1.self_attn.o_proj", "model.layers.1.mlp.up_proj"]
# Empirical labels make the result deterministic; one sink token also exercises A_sink / n_sink.
CFG = CollectConfig(labels="empirical", sink_tokens=1)
WORLD = 2
DIST_ENV = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def _tiny_llama():
    """Same seed, same weights in every process. float64 so that different batch compositions (each
    rank pads its own shard) agree to round-off, which the 1e-10 tolerance below relies on."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=False, pad_token_id=0, bos_token_id=None, eos_token_id=None)
    torch.manual_seed(1234)
    return LlamaForCausalLM(cfg).double().eval()


def _sequences(n: int = 10, seed: int = 7) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(1, VOCAB) for _ in range(rng.randint(3, 20))] for _ in range(n)]


def _flatten(stats: KFACStats) -> dict[str, torch.Tensor]:
    out = {}
    for name, s in stats.items():
        out[f"{name}.A"] = s.A.contiguous()
        out[f"{name}.S"] = s.S.contiguous()
        out[f"{name}.A_sink"] = s.A_sink.contiguous()
        out[f"{name}.counts"] = torch.tensor([s.n, s.n_sink], dtype=torch.int64)
    return out


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _layer(d_in: int, d_out: int, sink: bool = False) -> LayerStats:
    s = LayerStats.zeros(d_in, d_out, sink=sink)
    s.A += 1.0
    s.S += 2.0
    s.n = 3
    return s


def _mismatch_message(stats: KFACStats, ctx: DistContext) -> str | None:
    try:
        all_reduce_stats(stats, ctx)
    except CrispEditError as e:
        return str(e)
    return None


def _worker(rank: int, world: int, port: int, out_dir: str, seqs: list[list[int]]) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world),
                      RANK=str(rank), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    ctx = init_distributed("cpu", timeout=timedelta(seconds=60))
    try:
        model = _tiny_llama()
        stats = collect_lm_stats_distributed(model, seqs, TARGETS, CFG, ctx, batch_size=3, progress=False)
        if is_main(ctx):
            save_file(_flatten(stats), str(Path(out_dir) / "stats.safetensors"))

        # Layouts that differ across ranks must be refused on every rank, before any sum is taken.
        other_name = KFACStats({"a": _layer(4, 3), ("b" if rank == 1 else "c"): _layer(4, 3)})
        other_shape = KFACStats({"a": _layer(4, 3 + rank)})
        other_sink = KFACStats({"a": _layer(4, 3, sink=rank == 1)})
        same = KFACStats({"a": _layer(4, 3, sink=True), "b": _layer(2, 5)})
        report = {
            "rank": rank, "world_size": ctx.world_size, "backend": ctx.backend, "device": str(ctx.device),
            "initialised_here": ctx.initialised_here, "seed": rank_config(CFG, ctx).seed,
            "name": _mismatch_message(other_name, ctx),
            "shape": _mismatch_message(other_shape, ctx),
            "sink": _mismatch_message(other_sink, ctx),
            "same": _mismatch_message(same, ctx),
            "same_A": same["a"].A[0, 0].item(), "same_counts": [same["a"].n, same["b"].n],
        }
        (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(report))
    finally:
        shutdown(ctx)


@pytest.fixture
def no_dist_env(monkeypatch):
    for var in DIST_ENV:
        monkeypatch.delenv(var, raising=False)


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_two_gloo_ranks_match_single_process(tmp_path, no_dist_env):
    seqs = _sequences()
    port = _free_port()
    procs = mp.spawn(_worker, args=(WORLD, port, str(tmp_path), seqs), nprocs=WORLD, join=False)
    try:  # the reference is computed while the ranks start (their imports dominate the run time)
        ref = collect_lm_stats(_tiny_llama(), seqs, TARGETS, CFG, batch_size=4, progress=False)
    finally:
        while not procs.join():  # re-raises a rank's exception; terminates the other rank
            pass
    got = load_file(str(tmp_path / "stats.safetensors"))
    assert ref.n_tokens == sum(len(s) for s in seqs) - len(seqs)  # one sink token per sequence
    for name, s in ref.items():
        assert got[f"{name}.counts"].tolist() == [s.n, s.n_sink]
        assert s.S.norm() > 0 and s.A_sink.norm() > 0
        assert _rel_err(got[f"{name}.A"], s.A) < 1e-10
        assert _rel_err(got[f"{name}.S"], s.S) < 1e-10
        assert _rel_err(got[f"{name}.A_sink"], s.A_sink) < 1e-10

    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]
    for r, rep in enumerate(reports):
        assert (rep["rank"], rep["world_size"], rep["backend"], rep["device"]) == (r, WORLD, "gloo", "cpu")
        assert rep["initialised_here"] is True
        assert rep["seed"] == CFG.seed + r
        for case in ("name", "shape", "sink"):
            assert rep[case] is not None, f"rank {r}: {case} mismatch was not detected"
            assert "differ from those of rank 0" in rep[case] and "rank(s) [1]" in rep[case]
        assert rep["same"] is None
        assert rep["same_A"] == WORLD * 1.0 and rep["same_counts"] == [WORLD * 3, WORLD * 3]


def test_single_process_context_is_plain_collection(no_dist_env):
    ctx = init_distributed("cpu")
    assert ctx == DistContext(0, 1, 0, torch.device("cpu"), None, False)
    assert is_main(ctx) and rank_config(CFG, ctx) is CFG
    shutdown(ctx)  # nothing was initialised: a no-op

    torch.set_num_threads(1)
    model, seqs = _tiny_llama(), _sequences(n=4)
    ref = collect_lm_stats(model, seqs, TARGETS, CFG, batch_size=2, progress=False)
    got = collect_lm_stats_distributed(model, seqs, TARGETS, CFG, ctx, batch_size=2, progress=False)
    for name, s in ref.items():
        assert torch.equal(got[name].A, s.A) and torch.equal(got[name].S, s.S)
        assert (got[name].n, got[name].n_sink) == (s.n, s.n_sink)

    # An existing `stats=` is added to, once.
    base = ref.clone()
    out = collect_lm_stats_distributed(model, seqs, TARGETS, CFG, ctx, batch_size=2, progress=False, stats=base)
    assert out is base
    for name, s in ref.items():
        assert torch.allclose(out[name].A, 2 * s.A, rtol=1e-12, atol=0) and out[name].n == 2 * s.n


def test_rank_config_offsets_seed_only_under_several_ranks():
    cfg = CollectConfig(labels="sampled", seed=5)
    assert rank_config(cfg, DistContext(rank=0, world_size=3)).seed == 5
    assert rank_config(cfg, DistContext(rank=2, world_size=3)) == CollectConfig(labels="sampled", seed=7)


def test_init_distributed_rejects_bad_environment(monkeypatch, no_dist_env):
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(CrispEditError, match="WORLD_SIZE must be an integer"):
        init_distributed("cpu")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(CrispEditError, match="RANK is not set"):
        init_distributed("cpu")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(CrispEditError, match="MASTER_ADDR is not set"):
        init_distributed("cpu")
    if not torch.cuda.is_available():
        monkeypatch.delenv("WORLD_SIZE")
        with pytest.raises(CrispEditError, match="CUDA is not available"):
            init_distributed("cuda")
