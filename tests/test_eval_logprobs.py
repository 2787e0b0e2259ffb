"""Teacher-forced target log-probs in padded batches equal a per-sequence, full-logits oracle."""

from __future__ import annotations

import pytest
import torch

from crispedit.evaluation.logprobs import accepts_logits_to_keep, target_predictions


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_batched_target_logprobs_match_unpadded_oracle(arch):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2,
                                             initializer_range=0.3)).eval()
    else:  # absolute position embeddings: right padding must not shift positions
        model = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                           initializer_range=0.3)).eval()
    assert accepts_logits_to_keep(model)
    g = torch.Generator().manual_seed(1)
    seqs = [(torch.randint(2, 50, (lp,), generator=g).tolist(), torch.randint(2, 50, (lt,), generator=g).tolist())
            for lp, lt in [(1, 1), (7, 3), (3, 6), (12, 1), (5, 5), (2, 9)]]
    got = target_predictions([model, model], seqs, pad_id=0, batch_size=4)
    assert got[0] == got[1]
    with torch.no_grad():
        for (p, t), (argmax, lps) in zip(seqs, got[0]):
            logits = model(input_ids=torch.tensor([p + t])).logits[0, len(p) - 1:len(p) + len(t) - 1]
            lp = torch.log_softmax(logits.double(), -1)
            assert argmax == logits.argmax(-1).tolist()
            assert lps == pytest.approx(lp[torch.arange(len(t)), torch.tensor(t)].tolist(), abs=1e-5)


def test_empty_prompt_or_target_is_rejected():
    with pytest.raises(ValueError, match="sequence 1"):
        target_predictions([], [([1], [2]), ([], [3])], pad_id=0)
