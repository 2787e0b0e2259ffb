"""Shared test helpers (no hub access): tiny tokenizers and tiny models built in memory."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

BPE_TEXTS = [
    "The Eiffel Tower is located in Paris.",
    "The capital of France is Paris.",
    "Please answer the question:\n\nQ: Who wrote Hamlet?\nA: Shakespeare.",
    "The mother tongue of Danielle Darrieux is French. The language of Toko Yasuda is English.",
    "Question: Which is the most likely effect of this increase in rotation?\n"
    "Answer: Planetary days will become shorter.",
    "Reply: yes. Reply: no. The answer is yes, not no.",
    "The Colosseum is in the city of Rome. Danielle Darrieux speaks German and English.",
]


@pytest.fixture(scope="session")
def byte_bpe_tokenizer():
    """A tiny byte-level BPE tokenizer trained in memory: any text round-trips exactly (spaces and
    newlines included); specials <eos> (id 0) and <pad> (id 1); adds no BOS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<eos>", "<pad>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(BPE_TEXTS * 3, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>")


def make_biased_llama(vocab_size: int, seed: int = 0, eos_token_id: int = 0, pad_token_id: int = 1,
                      init_std: float = 0.02, layers: int = 2):
    """A tiny random Llama whose logits get `bigram[current_token]` added: setting bigram[a, b] large
    makes b follow a, which rigs the model's preferences while keeping a real architecture (KV cache,
    position ids, padding) under test. The bias depends only on the current token, so it is the same
    with and without the KV cache."""
    from transformers import LlamaConfig, LlamaForCausalLM

    class _Biased(LlamaForCausalLM):
        def forward(self, input_ids=None, **kwargs):
            out = super().forward(input_ids=input_ids, **kwargs)
            k = out.logits.shape[1]
            out.logits = out.logits + self.bigram[input_ids[:, -k:]].to(out.logits.dtype)
            return out

    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      initializer_range=init_std, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
                      bos_token_id=None, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = _Biased(cfg)
    model.register_buffer("bigram", torch.zeros(vocab_size, vocab_size), persistent=False)
    return model.eval()


@pytest.fixture
def biased_llama():
    """Factory: biased_llama(vocab_size, seed=0, ...) -> a tiny Llama with a settable `bigram` logit bias."""
    return make_biased_llama


def save_tiny_model(folder, tokenizer, seed: int):
    """A tiny random Llama (2 blocks) with `tokenizer`, saved as a model folder the CLI can load."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=False, pad_token_id=tokenizer.pad_token_id,
                      eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
    torch.manual_seed(seed)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


# ------------------------------------------------------------------ tiny MLP heads (study and EK-FAC oracles)


def tiny_head(seed: int = 0, d_in: int = 6, hidden: int = 5, classes: int = 4):
    """The study's two-layer head in float64, with non-zero biases (they must not leak into the weight
    curvature)."""
    from crispedit.study.lenet import Head

    torch.manual_seed(seed)
    h = Head(hidden, d_in=d_in, classes=classes).double()
    with torch.no_grad():
        h.fc2.bias.normal_()
        h.fc3.bias.normal_()
    return h


def tiny_data(n: int, d_in: int = 6, classes: int = 4, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d_in, generator=g, dtype=torch.float64), torch.randint(0, classes, (n,), generator=g)


def head_blocks(M: torch.Tensor, head) -> dict[str, torch.Tensor]:
    """The per-weight diagonal blocks of a curvature matrix over (fc2.weight, fc3.weight)."""
    n2 = head.fc2.weight.numel()
    return {"fc2": M[:n2, :n2], "fc3": M[n2:, n2:]}


# ------------------------------------------------------------------ the CLI, in-process


@pytest.fixture
def cli(capsys):
    """cli(*args) -> (exit status, stdout, stderr) of `crispedit ARGS`, run in-process."""
    from crispedit.cli import main

    def run(*args: str | Path) -> tuple[int, str, str]:
        with pytest.raises(SystemExit) as e:
            main([str(a) for a in args])
        out, err = capsys.readouterr()
        return e.value.code, out, err

    return run


def error_lines(err: str) -> list[str]:
    """stderr lines that are not progress bars."""
    lines = [seg.strip() for line in err.splitlines() for seg in line.split("\r")]
    return [ln for ln in lines if ln and "it/s]" not in ln and "batch/s]" not in ln and "?it/s" not in ln]


def assert_user_error(code: int, err: str, *fragments: str) -> None:
    """One line `crispedit: error: ...` holding every fragment, exit status 2, no traceback."""
    lines = error_lines(err)
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("crispedit: error: "), lines
    assert "Traceback" not in err
    for f in fragments:
        assert f in lines[0], (f, lines[0])
