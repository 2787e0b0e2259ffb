"""QA- and chat-formatted capability text (the README's "tried, not adopted" curvature corpus): sentences of the
embedded Wikipedia excerpt's *training* split, each cut into a question (its first 3–8 words) and an answer (the
rest), alternately in the WILD QA context and in the model's chat template; one JSONL line {"text": ...} each.

    python scripts/context_corpus.py --n 400 --out runs/qa_chat.jsonl
    cp -r runs/cache-L4-6 runs/cache-qa
    crispedit curvature --model smollm2-135m-instruct --layers 'model.layers.{4-6}.mlp.down_proj' \\
        --corpus runs/qa_chat.jsonl --samples 300 --extend --out runs/cache-qa
"""

from __future__ import annotations

import argparse
import json
import random
import re


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct", help="whose chat template to use")
    ap.add_argument("--n", type=int, default=400)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    from crispedit.data.corpus import load_documents, split_documents
    from crispedit.formatting import QA_CONTEXT
    from crispedit.models.loading import load_model

    _, tok = load_model(a.model)
    train, _ = split_documents(load_documents("wikipedia"))
    rng = random.Random(a.seed)
    sents = [s for d in train for s in re.split(r"(?<=[.!?])\s+", d) if 8 <= len(s.split()) <= 30]
    rng.shuffle(sents)
    with open(a.out, "w") as f:
        for i, s in enumerate(sents[:a.n]):
            words = s.split()
            k = rng.randint(3, min(8, len(words) - 2))
            q, ans = " ".join(words[:k]), " ".join(words[k:])
            if i % 2 == 0:
                text = QA_CONTEXT.format(q=q) + " " + ans
            else:
                text = tok.apply_chat_template([{"role": "user", "content": q}, {"role": "assistant", "content": ans}],
                                               tokenize=False)
            f.write(json.dumps({"text": text}) + "\n")
    print(f"{min(a.n, len(sents))} documents from {len(sents)} sentences -> {a.out}")


if __name__ == "__main__":
    main()
