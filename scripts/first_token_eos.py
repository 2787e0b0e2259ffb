"""First-token probabilities of EOS and of the target under three prompt formats, base vs a saved edit (the figures in
README "Prompt formats never trained in"): python scripts/first_token_eos.py  (delta: runs/ctx/deltas/defaults-cf, 100 CF)."""
import torch
torch.set_num_threads(1)
from crispedit.data.readers import load_requests
from crispedit.editing.delta import EditDelta, materialize
from crispedit.models.loading import load_model
from crispedit.models.targets import target_weight
reqs = load_requests("../shared/data/counterfact/counterfact-edit.json", limit=100)
model, tok = load_model("smollm2-135m-instruct")
d = EditDelta.load("runs/ctx/deltas/defaults-cf")
base = {n: target_weight(model, n).detach().clone() for n in d.targets}
eos = tok.eos_token_id; nl = tok("\n", add_special_tokens=False)["input_ids"]
print("eos", eos, "newline ids", nl)
fmts = {"Q/A": "Question: {q}\nAnswer:", "WILD QA": "Please answer the question:\n\nQ: {q}\nA:", "one-shot": "Q: What is the capital of France?\nA: Paris\n\nQ: {q}\nA:"}
for who in ("base", "edited"):
    if who == "edited":
        with torch.no_grad():
            for n in d.targets:
                target_weight(model, n).copy_(materialize(base[n], d.deltas[n].to(base[n].dtype)))
    for name, f in fmts.items():
        pe, pt = [], []
        with torch.no_grad():
            for r in reqs:
                ids = tok(f.format(q=r.prompt))["input_ids"]
                tgt = tok(" " + r.target, add_special_tokens=False)["input_ids"][0]
                p = torch.softmax(model(torch.tensor([ids])).logits[0, -1].float(), -1)
                pe.append(float(p[eos])); pt.append(float(p[tgt]))
        print(f"{who:7s} {name:9s} mean P(EOS first) {sum(pe)/len(pe):.3f}  mean P(target first token) {sum(pt)/len(pt):.3f}")
