"""The edit loss with the frozen prefix cached and logits only at the target positions equals the plain forward:
loss and target-weight gradients on tiny float64 models of four architectures, and the delta of a short edit."""

from __future__ import annotations

import random
import warnings

import pytest
import torch

from crispedit.editing.forward import EditForward, find_layer_stack, per_sequence_mean
from crispedit.formatting import EncodedPair

VOCAB = 40


def _llama(kind: str):
    import transformers as tf

    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0,
                  bos_token_id=None, eos_token_id=1)
    if kind == "llama":
        cfg, cls = tf.LlamaConfig(**common, tie_word_embeddings=True), tf.LlamaForCausalLM
    elif kind == "qwen2":
        cfg, cls = tf.Qwen2Config(**common, tie_word_embeddings=False), tf.Qwen2ForCausalLM
    elif kind == "mistral":
        cfg, cls = tf.MistralConfig(**common, tie_word_embeddings=False), tf.MistralForCausalLM
    else:
        cfg = tf.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=4, n_head=4, n_positions=64, pad_token_id=0,
                            bos_token_id=1, eos_token_id=1)
        cls = tf.GPT2LMHeadModel
    torch.manual_seed(0)
    return cls(cfg).double().eval()


TARGETS = {
    "llama": ["model.layers.2.mlp.down_proj", "model.layers.3.mlp.down_proj"],
    "qwen2": ["model.layers.1.mlp.down_proj", "model.layers.2.self_attn.o_proj"],
    "mistral": ["model.layers.2.mlp.down_proj"],
    "gpt2": ["transformer.h.2.mlp.c_proj", "transformer.h.3.mlp.c_fc"],
}


def _pairs(n: int = 7, seed: int = 3) -> list[EncodedPair]:
    rng = random.Random(seed)
    return [EncodedPair([rng.randrange(2, VOCAB) for _ in range(rng.randint(2, 12))],
                        [rng.randrange(2, VOCAB) for _ in range(rng.randint(1, 4))] + [1]) for _ in range(n)]


def _loss_and_grads(model, targets, fwd: EditForward, idx):
    weights = [model.get_submodule(n).weight for n in targets]
    for p in model.parameters():
        p.requires_grad_(False)
    for w in weights:
        w.requires_grad_(True)
    nll, rows = fwd.token_nll(idx)
    loss = nll.mean()
    grads = torch.autograd.grad(loss, weights)
    return nll.detach(), rows, [g.detach() for g in grads]


@pytest.mark.parametrize("kind", ["llama", "qwen2", "mistral", "gpt2"])
def test_cached_prefix_and_target_logits_equal_the_plain_forward(kind):
    model, targets, pairs = _llama(kind), TARGETS[kind], _pairs()
    stack = find_layer_stack(model, targets)
    assert stack is not None and stack.first == min(int(t.split(".")[2]) for t in targets)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a fallback would hide a wrong shortcut
        fast = EditForward(model, targets, pairs, pad_id=0)
    plain = EditForward(model, targets, pairs, pad_id=0, cache_prefix=False, logits_at_targets=False)
    assert fast.stack is not None and fast.logits_at_targets and not plain.uses_shortcuts
    for idx in ([0, 1, 2], [6, 3, 5, 4], [2]):  # different paddings and batch compositions
        a_nll, a_rows, a_grads = _loss_and_grads(model, targets, fast, idx)
        b_nll, b_rows, b_grads = _loss_and_grads(model, targets, plain, idx)
        assert torch.equal(a_rows, b_rows)
        assert torch.allclose(a_nll, b_nll, rtol=1e-12, atol=1e-12)
        for ga, gb in zip(a_grads, b_grads):
            assert gb.norm() > 0
            assert torch.allclose(ga, gb, rtol=1e-10, atol=1e-12), float((ga - gb).abs().max())


def test_the_model_is_left_as_it_was():
    model, targets, pairs = _llama("llama"), TARGETS["llama"], _pairs()
    layers = list(model.model.layers)
    fwd = EditForward(model, targets, pairs, pad_id=0)
    fwd.token_nll([0, 1])
    assert list(model.model.layers) == layers
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())


def test_prefix_is_rebuilt_when_a_frozen_weight_below_changes():
    model, targets, pairs = _llama("llama"), TARGETS["llama"], _pairs()
    fwd = EditForward(model, targets, pairs, pad_id=0)
    with torch.no_grad():
        before, _ = fwd.token_nll([0, 1])
        model.model.layers[0].mlp.up_proj.weight.mul_(1.5)  # below the first target (layer 2)
        after, _ = fwd.token_nll([0, 1])
    plain = EditForward(model, targets, pairs, pad_id=0, cache_prefix=False, logits_at_targets=False)
    with torch.no_grad():
        ref, _ = plain.token_nll([0, 1])
    assert not torch.allclose(before, after)
    assert torch.allclose(after, ref, rtol=1e-12, atol=1e-12)


def test_targets_outside_the_layer_list_disable_the_prefix_only():
    model = _llama("qwen2")
    fwd = EditForward(model, ["lm_head"], _pairs(), pad_id=0)
    assert fwd.stack is None and fwd.logits_at_targets
    assert find_layer_stack(model, ["model.layers.0.mlp.down_proj"]).first == 0


def test_logit_post_processing_falls_back_to_the_plain_forward():
    """A model that changes its logits after the LM head (here: scaled) must not get the target-logits shortcut."""
    model = _llama("llama")
    original = type(model).forward

    def scaled(self, *a, **k):
        out = original(self, *a, **k)
        out.logits = out.logits * 2.0
        return out

    model.forward = scaled.__get__(model)
    with pytest.warns(RuntimeWarning, match="using the plain forward"):
        fwd = EditForward(model, TARGETS["llama"], _pairs(), pad_id=0)
    assert not fwd.uses_shortcuts


def test_per_sequence_mean():
    nll = torch.tensor([1.0, 3.0, 5.0, 2.0])
    rows = torch.tensor([0, 0, 2, 2])
    assert per_sequence_mean(nll, rows, 3).tolist() == [2.0, 0.0, 3.5]


def test_short_edit_gives_the_same_delta_with_and_without_shortcuts(byte_bpe_tokenizer):
    from crispedit.data.records import EditRequest
    from crispedit.editing.config import EditConfig
    from crispedit.editing.engine import edit
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = byte_bpe_tokenizer
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=48, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=None)
    reqs = [EditRequest("The capital of France is", "Rome"), EditRequest("The Eiffel Tower is in", "Paris"),
            EditRequest("Danielle Darrieux speaks", "German")]
    targets = ["model.layers.2.mlp.down_proj", "model.layers.3.mlp.down_proj"]
    deltas = []
    for shortcuts in (True, False):
        torch.manual_seed(0)
        model = LlamaForCausalLM(cfg).double().eval()
        ec = EditConfig(method="ft", lr=1e-2, epochs=3, batch_size=2, cache_prefix=shortcuts,
                        target_logits=shortcuts)
        res = edit(model, tok, reqs, targets, ec, progress=False)
        deltas.append(res.delta.deltas)
    for n in targets:
        assert deltas[0][n].norm() > 0
        assert torch.allclose(deltas[0][n], deltas[1][n], rtol=1e-6, atol=1e-9)


def test_the_record_counts_the_padded_share_of_the_positions_run(byte_bpe_tokenizer):
    from crispedit.data.records import EditRequest
    from crispedit.editing.batches import build_training, training_contexts
    from crispedit.editing.config import EditConfig
    from crispedit.editing.engine import edit
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = byte_bpe_tokenizer
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=None)
    reqs = [EditRequest("The capital of France is", "Rome"), EditRequest("The Eiffel Tower in Paris is in", "Rome")]
    targets = ["model.layers.1.mlp.down_proj"]
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).double().eval()
    common = dict(method="ft", epochs=2, edit_positions="all", contexts=("raw", "qa"), prefixes=0)
    one = edit(model, tok, reqs, targets, EditConfig(batch_size=1, **common))
    one.delta.revert(model)
    assert one.delta.record["forward"]["padded_share"] == 0.0  # a batch of one has no padding
    whole = edit(model, tok, reqs, targets, EditConfig(batch_size=64, length_window=0, **common))
    seqs, _ = build_training(model, tok, reqs, training_contexts(tok, ("raw", "qa")), 0, 0)
    lengths = [len(s.pair.input_ids) for s in seqs]
    assert len(set(lengths)) > 1
    expected = 1 - sum(lengths) / (len(lengths) * max(lengths))  # every epoch is one batch of all sequences
    assert whole.delta.record["forward"]["padded_share"] == pytest.approx(expected, abs=1e-4)


def test_epoch_batches_cover_every_sequence_once_and_group_lengths():
    from crispedit.editing.engine import epoch_batches

    rng = random.Random(0)
    lengths = [rng.choice([8, 20, 40]) + rng.randrange(3) for _ in range(100)]
    plain = epoch_batches(lengths, 8, torch.Generator().manual_seed(1), window=0)
    grouped = epoch_batches(lengths, 8, torch.Generator().manual_seed(1), window=4)
    for batches in (plain, grouped):
        flat = [i for b in batches for i in b]
        assert sorted(flat) == list(range(100)) and all(1 <= len(b) <= 8 for b in batches)

    def padding(batches):
        return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)

    assert padding(grouped) < 0.5 * padding(plain)
    assert grouped == epoch_batches(lengths, 8, torch.Generator().manual_seed(1), window=4)  # seeded


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_active_positions_confine_the_change_and_its_gradient(kind):
    """With `active` positions the targets act with their base weights elsewhere: the loss and the gradient equal an
    independent oracle out = W0·x + mask·(ΔW·x), with ΔW a leaf (float64); with no change the loss is the plain
    one."""
    from crispedit.models.targets import as_weight_matrix, weight_matrix

    model, targets, pairs = _llama(kind), TARGETS[kind], _pairs()
    active = [(1, 3), None, (0,), (2, 4, 5), None, (1,), (0, 1)]
    base = {n: weight_matrix(model.get_submodule(n)).detach().clone() for n in targets}
    fwd = EditForward(model, targets, pairs, pad_id=0, active=active, base_weights=base)
    plain = EditForward(model, targets, pairs, pad_id=0, cache_prefix=False, logits_at_targets=False)
    idx = [0, 1, 2, 3, 5]
    assert torch.allclose(_loss_and_grads(model, targets, fwd, idx)[0], _loss_and_grads(model, targets, plain, idx)[0],
                          rtol=1e-12, atol=1e-12)
    torch.manual_seed(1)
    changes = {n: 0.3 * torch.randn_like(b) for n, b in base.items()}
    with torch.no_grad():
        for n in targets:
            weight_matrix(model.get_submodule(n)).copy_(base[n] + changes[n])
    nll, _, grads = _loss_and_grads(model, targets, fwd, idx)

    # the oracle: base weights in the modules, the change added through a mask by hooks, gradient w.r.t. the change
    with torch.no_grad():
        for n in targets:
            weight_matrix(model.get_submodule(n)).copy_(base[n])
    leaves = {n: c.clone().requires_grad_(True) for n, c in changes.items()}
    length = max(len(pairs[i].input_ids) for i in idx)
    mask = torch.zeros(len(idx), length, dtype=torch.float64)
    for r, i in enumerate(idx):
        if active[i] is None:
            mask[r] = 1
        else:
            mask[r, list(active[i])] = 1
    hooks = [model.get_submodule(n).register_forward_hook(
        lambda m, a, out, n=n: out + mask[..., None] * torch.nn.functional.linear(a[0], leaves[n])) for n in targets]
    try:
        ref = EditForward(model, targets, pairs, pad_id=0, cache_prefix=False, logits_at_targets=False, check=False)
        ref_nll, _ = ref.token_nll(idx)
        ref_grads = torch.autograd.grad(ref_nll.mean(), [leaves[n] for n in targets])
    finally:
        for h in hooks:
            h.remove()
    assert torch.allclose(nll, ref_nll.detach(), rtol=1e-10, atol=1e-12)
    for n, g, rg in zip(targets, grads, ref_grads):
        gm = as_weight_matrix(model.get_submodule(n), g)  # Conv1D keeps its weight as [in, out]
        assert rg.norm() > 0 and torch.allclose(gm, rg, rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match="one entry per sequence"):
        EditForward(model, targets, pairs, pad_id=0, active=active[:2], base_weights=base)


ACTIVE = [(3, 5), None, (1,), (2, 4, 5), (6,), (1,), (4, 7)]


@pytest.mark.parametrize("kind", ["llama", "qwen2", "mistral", "gpt2"])
def test_cached_frozen_positions_equal_running_every_position(kind):
    """With `active` positions, the kept layers run only from each sequence's first active (or scored) position, the
    earlier positions' keys/values cached: after a change of the targets, the loss and the gradients equal those of
    the same forward run over every position (float64), for mixed batches with and without frozen positions."""
    from crispedit.models.targets import weight_matrix

    model, targets, pairs = _llama(kind), TARGETS[kind], _pairs()
    base = {n: weight_matrix(model.get_submodule(n)).detach().clone() for n in targets}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a fallback would hide a wrong shortcut
        fast = EditForward(model, targets, pairs, pad_id=0, active=ACTIVE, base_weights=base)
        all_logits = EditForward(model, targets, pairs, pad_id=0, active=ACTIVE, base_weights=base,
                                 logits_at_targets=False)
    every = EditForward(model, targets, pairs, pad_id=0, active=ACTIVE, base_weights=base, cache_kv=False)
    assert fast.caches_kv and all_logits.caches_kv and not every.caches_kv
    # frozen = before the first active position and before the first scored one (the prompt's last token)
    expected = [0 if a is None else min(min(a), len(p.prompt_ids) - 1) for a, p in zip(ACTIVE, pairs)]
    assert fast.run_lengths() == [len(p.input_ids) - e for p, e in zip(pairs, expected)]
    assert fast.describe()["frozen_position_fraction"] > 0.1
    torch.manual_seed(1)
    with torch.no_grad():
        for n in targets:
            weight_matrix(model.get_submodule(n)).add_(0.3 * torch.randn_like(base[n]))
    for idx in (list(range(7)), [3, 0], [1], [4, 2]):
        a_nll, a_rows, a_grads = _loss_and_grads(model, targets, fast, idx)
        b_nll, b_rows, b_grads = _loss_and_grads(model, targets, every, idx)
        assert torch.equal(a_rows, b_rows)
        assert torch.allclose(a_nll, b_nll, rtol=1e-12, atol=1e-12)
        assert torch.allclose(_loss_and_grads(model, targets, all_logits, idx)[0], b_nll, rtol=1e-12, atol=1e-12)
        for ga, gb in zip(a_grads, b_grads):
            # (a top-layer target changed only before the scored positions has no gradient: not in the full batch)
            assert gb.norm() > 0 or len(idx) < 7
            assert torch.allclose(ga, gb, rtol=1e-10, atol=1e-12), float((ga - gb).abs().max())


def test_cached_keys_values_are_rebuilt_when_a_kept_weight_changes():
    """The frozen positions' keys/values depend on every weight of the kept layers but the targets': a change of one
    (here layer 3's value projection, above the first target) rebuilds them; the targets' own steps do not."""
    from crispedit.models.targets import weight_matrix

    model, targets, pairs = _llama("llama"), TARGETS["llama"], _pairs()
    base = {n: weight_matrix(model.get_submodule(n)).detach().clone() for n in targets}
    fast = EditForward(model, targets, pairs, pad_id=0, active=ACTIVE, base_weights=base)
    every = EditForward(model, targets, pairs, pad_id=0, active=ACTIVE, base_weights=base, cache_kv=False)
    with torch.no_grad():
        fast.token_nll([0, 3])
        kv = fast._kv
        weight_matrix(model.get_submodule(targets[0])).add_(0.1)
        fast.token_nll([0, 3])
        assert fast._kv is kv  # a target's step keeps the cache
        model.model.layers[3].self_attn.v_proj.weight.mul_(1.5)
        after, _ = fast.token_nll([0, 3])
    with torch.no_grad():
        ref, _ = every.token_nll([0, 3])
    assert fast._kv is not kv
    assert torch.allclose(after, ref, rtol=1e-12, atol=1e-12)


def test_short_subject_edit_gives_the_same_delta_with_and_without_cached_positions(byte_bpe_tokenizer):
    from crispedit.data.records import EditRequest
    from crispedit.editing.config import EditConfig
    from crispedit.editing.engine import edit
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = byte_bpe_tokenizer
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=48, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=None)
    reqs = [EditRequest("The capital of France is", "Rome", subject="France"),
            EditRequest("The Eiffel Tower is in", "Paris", subject="The Eiffel Tower"),
            EditRequest("Danielle Darrieux speaks", "German", subject="Danielle Darrieux")]
    targets = ["model.layers.1.mlp.down_proj", "model.layers.2.mlp.down_proj"]  # below the top: a gradient
    deltas, frozen = [], []
    for cached in (True, False):
        torch.manual_seed(0)
        model = LlamaForCausalLM(cfg).double().eval()
        # one batch per epoch: the batches do not depend on how long each sequence runs
        ec = EditConfig(method="ft", lr=1e-2, epochs=3, batch_size=8, contexts=("raw",), prefixes=0,
                        edit_positions="subject-last", cache_positions=cached)
        res = edit(model, tok, reqs, targets, ec, progress=False)
        deltas.append(res.delta.deltas)
        frozen.append(res.delta.record["forward"]["frozen_positions_cached"])
    assert frozen == [True, False]
    for n in targets:
        assert deltas[0][n].norm() > 0
        assert torch.allclose(deltas[0][n], deltas[1][n], rtol=1e-6, atol=1e-9)
