"""A/B of the edit forward with and without the frozen positions' key/value cache, on the same batches.

Builds the default training sequences of the first N CounterFact requests (raw + QA + chat + 2 prefixes, the
change acting at the subject's last token), then times forward + backward of the edit loss for ten batches of 32
with `EditForward(cache_kv=True)` and `cache_kv=False` interleaved (warm-up excluded), checks the losses agree, and
prints the median step times: first with the batches grouped by whole-sequence length, then by the length the
cached forward actually runs (what `edit` does now). No projection, no optimiser: the forward's own cost.

    python benchmarks/ab_frozen_positions.py [--n 100] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--edits", default="../shared/data/counterfact/counterfact-edit.json")
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)

    from crispedit.data.readers import load_requests
    from crispedit.editing.batches import build_training, training_contexts
    from crispedit.editing.config import EditConfig
    from crispedit.editing.engine import epoch_batches, training_positions
    from crispedit.editing.forward import EditForward
    from crispedit.models.loading import load_model
    from crispedit.models.runtime import pad_id_of
    from crispedit.models.targets import resolve_targets, weight_matrix

    model, tok = load_model(a.model)
    reqs = load_requests(a.edits, limit=a.n, skip_invalid=True)
    cfg = EditConfig()
    targets = resolve_targets(model, None)
    seqs, _ = build_training(model, tok, reqs, training_contexts(tok, cfg.contexts), cfg.prefixes, cfg.seed)
    active = training_positions(seqs, cfg.edit_positions)
    base = {n: weight_matrix(model.get_submodule(n)).clone() for n in targets}
    pairs = [s.pair for s in seqs]
    fast = EditForward(model, targets, pairs, pad_id_of(tok), active=active, base_weights=base)
    every = EditForward(model, targets, pairs, pad_id_of(tok), active=active, base_weights=base, cache_kv=False)
    for p in model.parameters():
        p.requires_grad_(False)
    weights = [model.get_submodule(n).weight for n in targets]
    for w in weights:
        w.requires_grad_(True)

    def step(fwd, idx):
        t = time.perf_counter()
        nll, _ = fwd.token_nll(idx)
        torch.autograd.grad(nll.mean(), weights)
        return time.perf_counter() - t, float(nll.detach().mean())

    out = {"n_requests": len(reqs), "training_sequences": len(pairs), "threads": a.threads,
           "forward": fast.describe()}
    for grouping, lengths in (("whole_length", [len(p.input_ids) for p in pairs]), ("run_length", fast.run_lengths())):
        batches = epoch_batches(lengths, cfg.batch_size, torch.Generator().manual_seed(0), cfg.length_window)
        step(fast, batches[0]), step(every, batches[0])  # warm-up
        t_fast, t_every = [], []
        for b in batches[1:11]:
            (tf, lf), (te, le) = step(fast, b), step(every, b)
            assert abs(lf - le) < 1e-3, (lf, le)
            t_fast.append(tf)
            t_every.append(te)
        out[grouping] = {"cached_median_s": statistics.median(t_fast), "every_position_median_s":
                         statistics.median(t_every)}
    whole = out["whole_length"]["every_position_median_s"]
    out["ratio_cached_over_every_position_same_batches"] = out["whole_length"]["cached_median_s"] / whole
    out["ratio_cached_run_length_batches_over_every_position"] = out["run_length"]["cached_median_s"] / whole
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
