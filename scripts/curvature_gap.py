"""How far the K-FAC quadratic model of a delta's capability cost is from the exact Gauss-Newton one, on the
curvature's own text and on held-out text, layer by layer and jointly; and what EK-FAC's corrected eigenvalues
would say.

The measured KL(base ‖ W₀ + α·ΔW) of a 300-edit delta is several times the K-FAC model's ½ΔᵀFΔ even at small α,
where the quadratic model's shape holds (`delta_kl_where.py`). The candidate causes are the Kronecker
factorisation (S ⊗ A is not the Gauss-Newton block), the sample (the kept subspace is low-curvature mostly on
the text it was estimated from) and the layers' cross terms (K-FAC is block-diagonal). This script computes, by
Monte Carlo over sampled labels, the exact Gauss-Newton quadratic form of the delta

    ½ ΔᵀGΔ = ½ (1/N) Σ_n E_y[ (Σ_l ⟨DW_n,y^l, ΔW^l⟩)² ],   DW_n,y^l = Σ_t g_t a_tᵀ (one sequence's weight gradient)

(per layer: only layer l's term; jointly: the sum inside the square, which holds the cross-layer terms), with N the
number of positions, so that it is the second-order term of the per-token KL. Beside it: K-FAC's ½Δᵀ(S⊗A)Δ from the
cache's factors, and EK-FAC's ½ Σ λ_ij (U_Sᵀ ΔW U_A)²_ij with λ_ij re-estimated on the cache's own sequences (George et
al. 2018); the share of ΔW's energy EK-FAC's γ-mask would remove; how much of K-FAC's kept subspace EK-FAC keeps.

    python scripts/curvature_gap.py --cache runs/cache-L4-6 --delta runs/s300/deltas/replay1-w1-cf --out gap.json
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from crispedit.curvature.api import Curvature
from crispedit.curvature.collect import Capture
from crispedit.curvature.energy import energy_cutoff_values
from crispedit.curvature.extend import curvature_sequences
from crispedit.data.corpus import corpus_of_curvature
from crispedit.editing.delta import EditDelta
from crispedit.editing.engine import kfac_quadratic_form
from crispedit.models.loading import load_model
from crispedit.models.runtime import frozen_parameters


def pass_over(model, seqs, names, deltas, eigen, mc: int, seed: int, sink_tokens: int, ekfac: bool) -> dict:
    """Monte-Carlo sums over `seqs`: exact quadratic forms (per layer, joint) and EK-FAC's Σ (U_Sᵀ DW U_A)²."""
    gen = torch.Generator().manual_seed(seed)
    modules = {n: model.get_submodule(n) for n in names}
    q = {n: 0.0 for n in names}
    q_joint = 0.0
    n_pos = 0
    sums = {n: torch.zeros(eigen[n].d_out, eigen[n].d_in, dtype=torch.float64) for n in names} if ekfac else None
    U = {n: (eigen[n].U_S.float(), eigen[n].U_A.float()) for n in names}
    t0 = time.time()
    with frozen_parameters(model):
        for k, s in enumerate(seqs):
            ids = torch.tensor([list(s)])
            with Capture(modules) as cap:
                logits = model(input_ids=ids).logits[0]
                outs = [cap.outputs[n] for n in names]
                probs = torch.softmax(logits.detach().float(), -1)
                for m in range(mc):
                    y = torch.multinomial(probs, 1, generator=gen).squeeze(-1)
                    loss = torch.nn.functional.cross_entropy(logits.float(), y, reduction="sum")
                    gs = torch.autograd.grad(loss, outs, retain_graph=m < mc - 1)
                    total = 0.0
                    for n, g in zip(names, gs):
                        a = cap.inputs[n][0].float()
                        g = g[0].float()
                        dw = g.T @ a
                        sc = float((dw.double() * deltas[n]).sum())
                        q[n] += sc * sc / mc
                        total += sc
                        if sums is not None:
                            dwc = g[sink_tokens:].T @ a[sink_tokens:]
                            r = U[n][0].T @ dwc @ U[n][1]
                            sums[n] += (r.double() ** 2) / mc
                    q_joint += total * total / mc
            n_pos += ids.shape[1]
            if (k + 1) % 25 == 0:
                print(f"  {k + 1}/{len(seqs)} sequences, {time.time() - t0:.0f} s", flush=True)
    out = {"positions": n_pos, "quadratic_exact": {n: 0.5 * v / n_pos for n, v in q.items()},
           "quadratic_exact_joint": 0.5 * q_joint / n_pos}
    out["quadratic_exact_sum_of_layers"] = sum(out["quadratic_exact"].values())
    if sums is not None:
        out["_lam"] = {n: v / n_pos for n, v in sums.items()}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--cache", required=True)
    p.add_argument("--delta", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--train", type=int, default=200, help="sequences of the cache's own sample (EK-FAC and forms)")
    p.add_argument("--heldout", type=int, default=32)
    p.add_argument("--mc", type=int, default=2, help="label samples per sequence")
    p.add_argument("--gamma", type=float, default=0.9)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = load_model(args.model)
    model.eval()
    delta = EditDelta.load(args.delta)
    cur = Curvature.load(args.cache, model).select(delta.targets, model)
    names = list(delta.targets)
    deltas = {n: delta.deltas[n].double() for n in names}
    eigen = cur.eigen
    sink = int(cur.config.sink_tokens)
    rows: dict = {"cache": args.cache, "delta": args.delta, "mc": args.mc, "gamma": args.gamma,
                  "kfac_quadratic": {n: kfac_quadratic_form(cur, n, deltas[n]) for n in names}}
    print("K-FAC ½ΔᵀFΔ", rows["kfac_quadratic"], flush=True)
    train = curvature_sequences(tok, cur.record)[: args.train]
    held = corpus_of_curvature(tok, cur, "heldout", args.heldout).sequences  # the cache's corpus, cut as it was
    tr = pass_over(model, train, names, deltas, eigen, args.mc, 0, sink, True)
    lam = tr.pop("_lam")
    rows["train"] = tr
    print("train", json.dumps(tr), flush=True)
    rows["heldout"] = pass_over(model, held, names, deltas, eigen, args.mc, 1, sink, False)
    print("heldout", json.dumps(rows["heldout"]), flush=True)
    ek: dict = {}
    kmasks = cur.masks(args.gamma, "layer")
    for n in names:
        e = eigen[n]
        lam_n = lam[n].clone()
        lam_n[:, : e.n_sink] = float("inf")
        rot = e.U_S.T @ deltas[n] @ e.U_A
        finite = lam_n[:, e.n_sink:]
        cut = energy_cutoff_values(finite, args.gamma)
        keep = lam_n < cut
        kk = kmasks[n]
        ek[n] = {"ekfac_quadratic": 0.5 * float((finite * rot[:, e.n_sink:] ** 2).sum()),
                 "kfac_products_quadratic": 0.5 * float((torch.outer(e.lam_S, e.lam_A[e.n_sink:])
                                                         * rot[:, e.n_sink:] ** 2).sum()),
                 "kept_fraction_ekfac": float(keep.double().mean()), "kept_fraction_kfac": float(kk.double().mean()),
                 "ekfac_keeps_of_kfac_kept": float((keep & kk).sum() / kk.sum()),
                 "delta_energy_removed_by_ekfac": float((rot[~keep] ** 2).sum() / (rot ** 2).sum())}
        print(n, ek[n], flush=True)
    rows["ekfac"] = ek
    with open(args.out, "w") as f:
        json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
