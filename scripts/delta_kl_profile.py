"""Where a delta's capability cost comes from: KL(base ‖ edited) along its path, layer by layer, and on the
curvature's own text against held-out text.

The K-FAC quadratic model in a delta's record predicts ½ ΔᵀFΔ per layer; the measured KL can be far above it.
Three measurements tell the usual causes apart:

* KL at α·ΔW for a few α: ∝ α² means the quadratic model's shape holds (its curvature is just too small);
  faster growth means the edit has left the region where any quadratic model holds.
* each layer's delta alone against all of them: a sum of the single-layer KLs far below the joint KL means the
  layers interact (K-FAC is block-diagonal across layers, so the projection never sees that).
* the training split of the corpus (the text the curvature was estimated on) against the held-out split: a much
  larger held-out KL means the kept subspace is low-curvature only on the sample it was estimated from.

    python scripts/delta_kl_profile.py --delta runs/s300/deltas/defaults-cf --out runs/s300/profile.json
"""

from __future__ import annotations

import argparse
import json

import torch

from crispedit.data.corpus import build_corpus
from crispedit.editing.budget import measure_kl
from crispedit.editing.delta import EditDelta, materialize
from crispedit.models.loading import load_model
from crispedit.models.runtime import pad_id_of
from crispedit.models.targets import target_weight


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--delta", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--chunks", type=int, default=32, help="chunks of each split")
    p.add_argument("--alphas", default="0.25,0.5,1")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = load_model(args.model)
    delta = EditDelta.load(args.delta)
    base = {n: target_weight(model, n).detach().clone() for n in delta.targets}
    deltas = {n: delta.deltas[n].to(base[n].dtype) for n in delta.targets}
    pad = pad_id_of(tok)
    splits = {s: build_corpus(tok, None, n_samples=args.chunks, max_length=256, split=s).sequences
              for s in ("train", "heldout")}

    def kl(scale: dict[str, float], split: str) -> float:
        edited = {n: materialize(b, scale.get(n, 0.0) * deltas[n]) for n, b in base.items()}
        r = measure_kl(model, base, edited, splits[split], pad)
        return r["kl_nats_per_token"]

    rows: dict = {"delta": args.delta, "chunks": args.chunks,
                  "kfac_quadratic_form": {n: d.get("kfac_quadratic_form")
                                          for n, d in (delta.record.get("diagnostics") or {}).items()},
                  "norm": {n: float(deltas[n].norm()) for n in delta.targets}}
    alphas = [float(a) for a in args.alphas.split(",")]
    for split in ("heldout", "train"):
        rows[f"path_{split}"] = {str(a): kl({n: a for n in base}, split) for a in alphas}
        print(split, "KL along the path", rows[f"path_{split}"], flush=True)
    rows["single_layer_heldout"] = {n: kl({n: 1.0}, "heldout") for n in base}
    print("single layers", rows["single_layer_heldout"], flush=True)
    with open(args.out, "w") as f:
        json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
