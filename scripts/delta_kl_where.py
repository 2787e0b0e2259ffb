"""Where, token by token, a delta's capability cost lands: KL(base ‖ edited) per position and per token on
held-out text, the cost with the change switched off at chosen positions, and the layers' cross terms at a
small scale (where the quadratic model should hold) against the full scale.

`delta_kl_profile.py` showed that the measured KL of a multi-layer delta is far above the block-diagonal K-FAC
model's ½ΔᵀFΔ and grows like a cliff along W₀ + α·ΔW. Three questions separate the candidate causes:

* is the cost spread over all tokens, or concentrated on a few positions (the first token, an attention sink
  every later position reads) or a few tokens? (`positions`, `top_share`, `mask_first`)
* do the layers' changes add up already at a small scale, where everything is quadratic (`cross_terms` at the
  small α: joint KL against the sum of single-layer KLs)? Then a joint (not block-diagonal) curvature would see
  it. If they add up only at the full scale, the interaction is nonlinear.

The delta acts through forward hooks that add α·mask·(x ΔWᵀ) to each target's output, so the change can be
switched off at single positions without touching the weights.

    python scripts/delta_kl_where.py --delta runs/s300/deltas/replay1-w1-cf --out where.json
"""

from __future__ import annotations

import argparse
import json
from contextlib import contextmanager

import torch

from crispedit.data.corpus import build_corpus
from crispedit.editing.delta import EditDelta
from crispedit.models.loading import load_model

BUCKETS = [(0, 1), (1, 4), (4, 16), (16, 64), (64, 10**9)]


@contextmanager
def applied(model, deltas: dict[str, torch.Tensor], scales: dict[str, float], off_positions: set[int] | None,
            only_positions: set[int] | None = None):
    """Add scale·(x ΔWᵀ) to each target's output, except at `off_positions` (or only at `only_positions`)."""
    handles = []
    for name, d in deltas.items():
        s = scales.get(name, 0.0)
        if s == 0.0:
            continue

        def hook(mod, inp, out, d=d, s=s):
            add = s * (inp[0].to(d.dtype) @ d.T)
            if off_positions or only_positions is not None:
                mask = torch.ones(add.shape[-2], 1, dtype=add.dtype)
                if only_positions is not None:
                    mask.zero_()
                    for p in only_positions:
                        if p < len(mask):
                            mask[p] = 1
                for p in off_positions or ():
                    if p < len(mask):
                        mask[p] = 0
                add = add * mask
            return out + add.to(out.dtype)

        handles.append(model.get_submodule(name).register_forward_hook(hook))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def per_token_kl(model, sequences, base_logp: list[torch.Tensor]) -> list[torch.Tensor]:
    out = []
    with torch.no_grad():
        for seq, lb in zip(sequences, base_logp):
            le = torch.log_softmax(model(torch.tensor([seq])).logits[0].float(), -1)
            out.append((lb.exp() * (lb - le)).sum(-1))
    return out


def summary(kls: list[torch.Tensor]) -> dict:
    allk = torch.cat(kls)
    n = allk.numel()
    srt = allk.sort(descending=True).values
    pos = {}
    for lo, hi in BUCKETS:
        vals = torch.cat([k[lo:hi] for k in kls if len(k) > lo])
        pos[f"{lo}-{min(hi, 10**4) - 1}"] = {"mean": float(vals.mean()), "share": float(vals.sum() / allk.sum()),
                                               "tokens": int(vals.numel())}
    return {"kl": float(allk.mean()), "tokens": n, "positions": pos,
            "top_share": {f"{q}": float(srt[: max(1, int(n * q))].sum() / allk.sum()) for q in (0.001, 0.01, 0.1)}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--delta", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--chunks", type=int, default=32)
    p.add_argument("--small", type=float, default=0.25, help="the small scale for the cross terms")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = load_model(args.model)
    model.eval()
    delta = EditDelta.load(args.delta)
    deltas = {n: delta.deltas[n].float() for n in delta.targets}
    seqs = build_corpus(tok, None, n_samples=args.chunks, max_length=256, split="heldout").sequences
    with torch.no_grad():
        base_logp = [torch.log_softmax(model(torch.tensor([s])).logits[0].float(), -1) for s in seqs]
    names = list(deltas)
    rows: dict = {"delta": args.delta, "chunks": args.chunks, "targets": names}

    def run(scales, off=None, only=None):
        with applied(model, deltas, scales, off, only):
            return per_token_kl(model, seqs, base_logp)

    full = {n: 1.0 for n in names}
    kls = run(full)
    rows["full"] = summary(kls)
    allk = torch.cat(kls)
    top = allk.topk(10)
    offsets = torch.tensor([0] + [len(k) for k in kls]).cumsum(0)
    worst = []
    for v, i in zip(top.values.tolist(), top.indices.tolist()):
        c = int((offsets[1:] <= i).sum())
        pos = i - int(offsets[c])
        seq = seqs[c]
        worst.append({"kl": v, "chunk": c, "position": pos, "token": tok.decode(seq[pos:pos + 1]),
                      "context": tok.decode(seq[max(0, pos - 8):pos + 1])})
    rows["worst_tokens"] = worst
    print("full", json.dumps(rows["full"]), flush=True)
    rows["first_position_off"] = float(torch.cat(run(full, off={0})).mean())
    rows["first_position_only"] = float(torch.cat(run(full, only={0})).mean())
    print("position 0 off / only", rows["first_position_off"], rows["first_position_only"], flush=True)
    cross: dict = {}
    for a in (args.small, 1.0):
        joint = float(torch.cat(run({n: a for n in names})).mean())
        single = {n: float(torch.cat(run({n: a})).mean()) for n in names}
        cross[str(a)] = {"joint": joint, "single": single, "joint_over_sum": joint / sum(single.values())}
        print("scale", a, cross[str(a)], flush=True)
    rows["cross_terms"] = cross
    with open(args.out, "w") as f:
        json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
