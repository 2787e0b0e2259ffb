"""A tiny float64 Llama, its curvature cache and a few edit requests, shared by the baseline tests."""

from __future__ import annotations

import torch

from crispedit.data.records import EditRequest, LocalityPrompt

REQUESTS = [
    EditRequest("The capital of France is", "Rome", subject="France"),
    EditRequest("The Eiffel Tower is located in", "Berlin", subject="The Eiffel Tower"),
    EditRequest("The mother tongue of Danielle Darrieux is", "German", subject="Danielle Darrieux",
                rephrases=("Danielle Darrieux speaks",), locality=(LocalityPrompt("The Colosseum is in", "Rome"),)),
    EditRequest("The Colosseum is in the city of", "Paris", subject="The Colosseum"),
]
CAPABILITY = [
    "Please answer the question: Who wrote Hamlet? Shakespeare.", "The language of Toko Yasuda is English.",
    "Planetary days will become shorter.", "The answer is yes, not no.", "Reply: yes. Reply: no.",
    "The Eiffel Tower is located in Paris.", "The capital of France is Paris.",
]
TARGETS = ["model.layers.1.mlp.down_proj", "model.layers.2.mlp.down_proj"]


def tiny_model(tokenizer, layers: int = 4, seed: int = 0):
    """A random 4-layer Llama in float64 (the edited layers 1-2 sit in the middle, so a value written at the
    subject's token still reaches the answer's positions through later attention)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      eos_token_id=0, pad_token_id=1, bos_token_id=None, initializer_range=0.2,
                      tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).double().eval()


def tiny_curvature(model, tokenizer, targets=TARGETS, sink_tokens: int = 1, n_random: int = 24,
                   n_texts: int = len(CAPABILITY)):
    from crispedit.curvature.api import Curvature, CurvatureConfig

    # real sentences plus seeded random token strings: enough distinct inputs for a full-rank A (d_in = 64)
    g = torch.Generator().manual_seed(1)
    seqs = [tokenizer(t)["input_ids"] for t in CAPABILITY[:n_texts]]
    seqs += [torch.randint(2, len(tokenizer), (12,), generator=g).tolist() for _ in range(n_random)]
    return Curvature.compute(model, targets, seqs, {"source": "test"},
                             CurvatureConfig(mc_samples=2, sink_tokens=sink_tokens), pad_id=1, progress=False)


def weights(model, targets=TARGETS):
    from crispedit.models.targets import weight_matrix

    return {n: weight_matrix(model.get_submodule(n)).detach().clone() for n in targets}


def captured_inputs_and_output_grads(model, loss_of_logits, input_ids, attention_mask, targets=TARGETS):
    """The oracle of the key/gradient captures: every position's input to each target and the loss's gradient
    with respect to its output, taken independently of the code under test (retain_grad on the outputs; no hook
    returns a modified output). `loss_of_logits` maps the logits to the scalar loss to differentiate."""
    ins, outs = {}, {}

    def hook(name):
        def fn(_m, inp, out):
            ins[name] = inp[0].detach()
            out.retain_grad()
            outs[name] = out
        return fn

    hs = [model.get_submodule(n).register_forward_hook(hook(n)) for n in targets]
    try:
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    finally:
        for h in hs:
            h.remove()
    loss_of_logits(logits).backward()
    return ins, {n: o.grad for n, o in outs.items()}
