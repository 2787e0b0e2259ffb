import time, torch, json, sys, statistics, math
from crispedit.models.loading import load_model
from crispedit.data.corpus import build_corpus
from crispedit.data.readers import load_requests
from crispedit.curvature.api import Curvature
from crispedit.editing.config import EditConfig
from crispedit.editing.engine import edit
from crispedit.formatting import encode_pair, PromptFormat, collate
torch.manual_seed(0); torch.set_num_threads(1)
model, tok = load_model("smollm2-135m-instruct")
cur = Curvature.load(sys.argv[1], model=model)
N = int(sys.argv[2])
reqs = load_requests("/work/shared/data/counterfact/counterfact-edit.json", limit=N)
held = build_corpus(tok, None, n_samples=24, max_length=128, seed=0, split="heldout").sequences

@torch.no_grad()
def tf_rel(prompts_targets):
    ok=0
    for p,t in prompts_targets:
        e = encode_pair(tok, p, t, PromptFormat(), add_eos=False)
        ids = torch.tensor([e.input_ids]); lg = model(input_ids=ids).logits[0]
        L=len(e.prompt_ids); pred = lg[L-1:L-1+len(e.target_ids)].argmax(-1).tolist()
        ok += pred == e.target_ids
    return ok/len(prompts_targets)

@torch.no_grad()
def ppl():
    nll=0; n=0
    for i in range(0,len(held),8):
        b = collate(held[i:i+8], tok.pad_token_id)
        lg = model(**b).logits[:, :-1].float(); tgt=b["input_ids"][:,1:]; m=b["attention_mask"][:,1:].bool()
        l = torch.nn.functional.cross_entropy(lg.reshape(-1,lg.shape[-1]), tgt.reshape(-1), reduction="none").view_as(tgt)
        nll += float(l[m].sum()); n+= int(m.sum())
    return math.exp(nll/n)
p0 = ppl(); print("base ppl", p0, "rel", tf_rel([(r.prompt,r.target) for r in reqs]), flush=True)
runs = [dict(method=m, gamma=g, lr=lr, projection_mode=mode) for (m,g,lr,mode) in [tuple(x.split(":")) for x in sys.argv[3:]]]
for r in runs:
    r["gamma"]=float(r["gamma"]); r["lr"]=float(r["lr"])
    cfg = EditConfig(epochs=int(25), batch_size=32, early_stop_loss=0.05, **r)
    res = edit(model, tok, reqs, cur.targets, cfg, curvature=cur, progress=False)
    out = dict(r, steps=res.steps, stopped=res.stopped, loss=res.epoch_losses[-1], rel=tf_rel([(q.prompt,q.target) for q in reqs]),
      gen=tf_rel([(q.rephrases[0],q.target) for q in reqs if q.rephrases]), ppl=ppl(), step_s=statistics.median(res.step_seconds), secs=res.seconds,
      qf=sum(v.get("kfac_quadratic_form",0) for v in res.diagnostics.values()), leak=max(v.get("removed_energy_fraction",0) for v in res.diagnostics.values()))
    out["ppl_change_%"] = 100*(out["ppl"]/p0-1)
    print(json.dumps(out), flush=True)
    res.delta.revert(model)
