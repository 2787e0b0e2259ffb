"""Distributed K-FAC collection: two gloo processes on 127.0.0.1 must reproduce the single-process sums, with
the default (sampled) labels, and leave no process-group thread behind when they shut down."""

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
    shutdown,
)
from crispedit.curvature.stats import KFACStats, LayerStats
from crispedit.errors import CrispEditError

VOCAB = 50
TARGETS = ["model.layers.0.mlp.down_proj", "model.layers.1.self_attn.o_proj", "model.layers.1.mlp.up_proj"]
# The default labels (sampled): they are drawn per sequence, so any sharding gives the same sums. One sink token
# also exercises A_sink / n_sink.
CFG = CollectConfig(sink_tokens=1)
# Threads of a live gloo process group (and of rank 0's TCPStore server); none may outlive `shutdown`.
GROUP_THREADS = ("pt_gloo_runloop", "gloo_tcp_loop", "pt_tcpstore_uv")
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


def _thread_names() -> list[str] | None:
    """This process's thread names (Linux), or None where /proc is not there."""
    task = Path("/proc/self/task")
    if not task.is_dir():
        return None
    names = []
    for t in task.iterdir():
        try:
            names.append((t / "comm").read_text().strip())
        except OSError:
            pass  # the thread ended while we looked
    return sorted(names)


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
            "initialised_here": ctx.initialised_here,
            "name": _mismatch_message(other_name, ctx),
            "shape": _mismatch_message(other_shape, ctx),
            "sink": _mismatch_message(other_sink, ctx),
            "same": _mismatch_message(same, ctx),
            "same_A": same["a"].A[0, 0].item(), "same_counts": [same["a"].n, same["b"].n],
        }
        (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(report))
    finally:
        shutdown(ctx)
    # Building the model imported torch._dynamo after the group existed (which binds group.WORLD into
    # torch.distributed.nn's default arguments unless init_distributed imported it first); a group kept
    # alive that way runs its threads into interpreter shutdown, which sometimes aborts the process.
    (Path(out_dir) / f"rank{rank}-threads.json").write_text(json.dumps(_thread_names()))


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
        for case in ("name", "shape", "sink"):
            assert rep[case] is not None, f"rank {r}: {case} mismatch was not detected"
            assert "differ from those of rank 0" in rep[case] and "rank(s) [1]" in rep[case]
        assert rep["same"] is None
        assert rep["same_A"] == WORLD * 1.0 and rep["same_counts"] == [WORLD * 3, WORLD * 3]
        threads = json.loads((tmp_path / f"rank{r}-threads.json").read_text())
        if threads is not None:
            left = [t for t in threads if t in GROUP_THREADS]
            assert not left, f"rank {r}: process-group threads alive after shutdown: {left}"


def test_single_process_context_is_plain_collection(no_dist_env):
    ctx = init_distributed("cpu")
    assert ctx == DistContext(0, 1, 0, torch.device("cpu"), None, False)
    assert is_main(ctx)
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


def test_sampled_labels_do_not_depend_on_batching_or_sharding():
    """Per-sequence label streams: batch size, batch order and a shard collected with its global indices
    all give the whole collection's sums (to round-off)."""
    torch.set_num_threads(1)
    model, seqs = _tiny_llama(), _sequences(n=9)
    ref = collect_lm_stats(model, seqs, TARGETS, CFG, batch_size=1, progress=False)
    other = collect_lm_stats(model, seqs, TARGETS, CFG, batch_size=4, progress=False)
    shards = collect_lm_stats(model, seqs[0::3], TARGETS, CFG, batch_size=2, progress=False, indices=range(0, 9, 3))
    for k in (1, 2):
        shards.add_(collect_lm_stats(model, seqs[k::3], TARGETS, CFG, batch_size=3, progress=False,
                                     indices=range(k, 9, 3)))
    reseeded = collect_lm_stats(model, seqs, TARGETS, CollectConfig(sink_tokens=1, seed=1), batch_size=4,
                                progress=False)
    for name, s in ref.items():
        for got in (other, shards):
            assert _rel_err(got[name].S, s.S) < 1e-10 and _rel_err(got[name].A, s.A) < 1e-10
            assert (got[name].n, got[name].n_sink) == (s.n, s.n_sink)
        assert _rel_err(reseeded[name].S, s.S) > 1e-3  # the seed does change the labels


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


def _cli_world(root: Path, tokenizer) -> tuple[Path, Path]:
    """A tiny float64 Llama folder (loaded with --dtype auto) and a small .txt corpus."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=False, pad_token_id=tokenizer.pad_token_id,
                      eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).double().save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    rng = random.Random(0)
    words = "the cat sat on a mat and Paris is the capital of France while Rome has the Colosseum".split()
    corpus = root / "corpus.txt"
    corpus.write_text("\n".join(" ".join(rng.choice(words) for _ in range(rng.randint(6, 20))) for _ in range(40)))
    return root / "model", corpus


def test_torchrun_curvature_cli_exits_zero_and_equals_one_process(tmp_path, no_dist_env, byte_bpe_tokenizer):
    """`torchrun --nproc_per_node 2 -m crispedit curvature` (gloo) with the default sampled labels writes the
    cache a single process writes (float64 model: to round-off) and both ranks exit 0."""
    import subprocess
    import sys

    model, corpus = _cli_world(tmp_path, byte_bpe_tokenizer)
    args = ["curvature", "--model", str(model), "--dtype", "auto", "--corpus", str(corpus), "--max-length", "24",
            "--samples", "7", "--batch-size", "3"]
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    one = subprocess.run([sys.executable, "-m", "crispedit", *args, "--out", str(tmp_path / "one")],
                         capture_output=True, text=True, timeout=300, env=env)
    assert one.returncode == 0, one.stderr
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "crispedit", *args, "--out", str(tmp_path / "two")],
                         capture_output=True, text=True, timeout=300, env=env)
    assert two.returncode == 0, two.stdout[-2000:] + two.stderr[-4000:]
    assert "terminate called" not in two.stderr and "on 2 processes" in two.stdout
    a = load_file(str(tmp_path / "one" / "stats.safetensors"))
    b = load_file(str(tmp_path / "two" / "stats.safetensors"))
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == torch.float64 and a[k].norm() > 0
        assert _rel_err(b[k], a[k]) < 1e-10, k
    rec = [json.loads((tmp_path / d / "curvature.json").read_text()) for d in ("one", "two")]
    assert rec[0]["counts"] == rec[1]["counts"] and rec[0]["collection"]["labels"] == "sampled"
    assert rec[0]["model_dtype"] == rec[1]["model_dtype"] == "float64"


@pytest.mark.slow
def test_torchrun_on_smollm2_equals_one_process(tmp_path, no_dist_env):
    """The embedded SmolLM2 (float32 forward), default sampled labels: 2 gloo ranks give the 1-process cache
    within 1e-5 relative (each rank pads its own shard, so the float32 forwards round differently)."""
    import subprocess
    import sys

    args = ["curvature", "--model", "smollm2-135m-instruct", "--layers", "model.layers.{10-12}.self_attn.o_proj",
            "--samples", "8", "--max-length", "64", "--batch-size", "3"]
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    one = subprocess.run([sys.executable, "-m", "crispedit", *args, "--out", str(tmp_path / "one")],
                         capture_output=True, text=True, timeout=1200, env=env)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "crispedit", *args, "--out", str(tmp_path / "two")],
                         capture_output=True, text=True, timeout=1200, env=env)
    assert two.returncode == 0, two.stdout[-2000:] + two.stderr[-4000:]
    a = load_file(str(tmp_path / "one" / "stats.safetensors"))
    b = load_file(str(tmp_path / "two" / "stats.safetensors"))
    assert sorted(a) == sorted(b) and len(a) == 9  # A, S and the sink factor of 3 targets
    errs = {k: _rel_err(b[k] @ b[k].T, a[k] @ a[k].T) if k.endswith("A_sink_factor") else _rel_err(b[k], a[k])
            for k in a}
    worst = {kind: max(v for k, v in errs.items() if k.endswith(kind)) for kind in (".A", ".S", ".A_sink_factor")}
    print("\nSmolLM2, 2 ranks vs 1 process, largest relative error:", {k: f"{v:.1e}" for k, v in worst.items()})
    assert max(errs.values()) < 1e-5, errs
