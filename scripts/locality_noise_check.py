"""Is generated first-token locality noise? Scale one edited layer's weights by (1 + 1e-4) and measure locality
against the unchanged base model on the first 20 CounterFact requests, at two generation batch sizes (the
README's check: a change this small flips no first token, so the metric measures the edit, not round-off).

    python scripts/locality_noise_check.py [--n 20] [--layer 5]
"""

from __future__ import annotations

import argparse
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=20)
    ap.add_argument("--layer", type=int, default=5)
    ap.add_argument("--edits", default="../shared/data/counterfact/counterfact-edit.json")
    a = ap.parse_args()
    torch.set_num_threads(1)
    from crispedit.data.readers import load_requests
    from crispedit.evaluation.edit_metrics import evaluate_edits
    from crispedit.evaluation.report import build_report
    from crispedit.models.loading import load_model

    requests = load_requests(a.edits, limit=a.n)
    model, tok = load_model("smollm2-135m-instruct")
    base, _ = load_model("smollm2-135m-instruct")
    with torch.no_grad():
        model.model.layers[a.layer].mlp.down_proj.weight.mul_(1 + 1e-4)
    for batch in (32, 7):
        t = time.perf_counter()
        em = evaluate_edits(model, tok, requests, base_model=base, teacher_forced=False,
                            generated_contexts=("qa", "chat", "raw"), generation_batch_size=batch,
                            show_progress=False)
        loc = {k: v for k, v in build_report(edit=em).summary.items() if k.startswith("locality_gen")}
        print(f"generation batch {batch}: {loc} ({time.perf_counter() - t:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
