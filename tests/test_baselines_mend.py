"""MEND on a tiny float64 Llama: the factors are the true gradient's, the edited weights equal base + the
hypernetwork's output, the hypernetwork file round-trips exactly and refuses another model, training learns."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from baselines_tiny import REQUESTS, TARGETS, captured_inputs_and_output_grads, tiny_model, weights

from crispedit.baselines import MendConfig, run_baseline, validate
from crispedit.baselines.mend import GradientTransform, MendNet, edit_batch, gradient_factors, load_hypernet, \
    per_request_nll, run_mend, save_hypernet
from crispedit.baselines.mend_train import MendTrainConfig, train_mend
from crispedit.errors import CrispEditError
from crispedit.models.targets import weight_matrix

TRAIN = MendTrainConfig(layers=",".join(TARGETS), rank=16, edits_per_step=2, steps=6, lr=1e-3, lr_lr=1e-3,
                        edit_lr=1e-2, log_every=2)


@pytest.fixture
def tiny(byte_bpe_tokenizer):
    return tiny_model(byte_bpe_tokenizer), byte_bpe_tokenizer


def _float64(net: MendNet) -> MendNet:
    return net.double()


def _independent_factors(model, batch):
    """(u, δ) at every position, by the shared retain_grad oracle."""
    return captured_inputs_and_output_grads(model, lambda logits: per_request_nll(logits, batch["targets"]).sum(),
                                            batch["input_ids"], batch["attention_mask"])


def test_gradient_factors_sum_to_the_weight_gradient(tiny):
    model, tok = tiny
    batch = edit_batch(tok, REQUESTS, "cpu")
    factors = gradient_factors(model, batch, TARGETS)
    loss = per_request_nll(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                           batch["targets"]).sum()
    grads = torch.autograd.grad(loss, [model.get_submodule(n).weight for n in TARGETS])
    for n, gW in zip(TARGETS, grads):
        u, d = factors[n]
        assert float((d.T @ u - gW).norm() / gW.norm()) < 1e-12
        assert u.shape[0] < batch["input_ids"].numel()  # padding/after-target positions (zero gradient) dropped


def test_normaliser_statistics_equal_those_of_all_rows():
    g = torch.Generator().manual_seed(0)
    t = GradientTransform(3, 2, rank=4, n_blocks=1, n_modes=1).double()
    rows = [torch.randn(m, 5, generator=g, dtype=torch.float64) for m in (3, 1, 6)]
    for x in rows:
        t.observe(x)
    allx = torch.cat(rows)
    z = t.normalize(allx)
    assert torch.allclose(z, (allx - allx.mean(0)) / (allx.std(0) + 1e-7), atol=1e-12)


def test_edited_weights_are_base_plus_the_hypernetwork_output(tiny, tmp_path):
    model, tok = tiny
    net, record = train_mend(model, tok, REQUESTS * 2, TRAIN)
    net = _float64(net)
    base = weights(model)
    delta = run_mend(model, tok, REQUESTS, MendConfig(batch_size=3), net=net, net_record=record)
    edited = weights(model)
    # oracle: factors captured independently on the base model, pushed through the hypernetwork by hand
    with torch.no_grad():
        for n in TARGETS:
            weight_matrix(model.get_submodule(n)).copy_(base[n])
    ins, douts = _independent_factors(model, edit_batch(tok, REQUESTS, "cpu"))
    for i, n in enumerate(TARGETS):
        u = ins[n].reshape(-1, ins[n].shape[-1])
        d = douts[n].reshape(-1, douts[n].shape[-1])
        keep = (d != 0).any(-1)
        g, mode = net.transform_of(n)
        with torch.no_grad():
            ut, dt = g(u[keep], d[keep], mode)
            expect = -net.edit_lrs[i] * (dt.T @ ut)
        assert float(expect.norm()) > 0
        assert float((delta.deltas[n].double() - expect).norm() / expect.norm()) < 1e-6  # float32 delta
        assert torch.equal(edited[n], (base[n].float() + delta.deltas[n]).double())
    assert delta.record["config"]["method"] == "mend"


def test_hypernetwork_file_round_trips_and_refuses_another_model(tiny, tmp_path, byte_bpe_tokenizer):
    model, tok = tiny
    net, record = train_mend(model, tok, REQUESTS * 2, dataclasses.replace(TRAIN, steps=2))
    path = save_hypernet(tmp_path / "mend", net, record)
    back, rec = load_hypernet(path)
    assert rec["training"]["steps"] == 2 and rec["targets"][0]["name"] == TARGETS[0]
    for (k, v), (k2, v2) in zip(net.state_dict().items(), back.state_dict().items()):
        assert k == k2 and torch.equal(v.cpu(), v2), k
    validate("mend", REQUESTS, MendConfig(hypernet=str(path)))
    d1 = run_baseline("mend", model, tok, REQUESTS, None, MendConfig(hypernet=str(path)))
    d1.revert(model)
    d2 = run_mend(model, tok, REQUESTS, MendConfig(), net=net, net_record=record)
    for n in TARGETS:
        assert torch.equal(d1.deltas[n], d2.deltas[n])
    d2.revert(model)
    other = tiny_model(byte_bpe_tokenizer, seed=1)
    with pytest.raises(CrispEditError, match="trained for another model"):
        run_baseline("mend", other, tok, REQUESTS, None, MendConfig(hypernet=str(path)))
    with pytest.raises(CrispEditError, match="not a MEND hypernetwork"):
        validate("mend", REQUESTS, MendConfig(hypernet=str(tmp_path)))


def test_training_lowers_the_post_edit_loss(tiny):
    model, tok = tiny
    _, record = train_mend(model, tok, REQUESTS * 4, dataclasses.replace(TRAIN, steps=40, log_every=10))
    curve = record["training"]["curve"]
    assert len(curve) == 4 and record["training"]["steps"] == 40
    assert curve[-1]["edit_nll"] < curve[0]["edit_nll"]
    assert curve[-1]["edit_nll"] < curve[-1]["pre_edit_nll"]  # the learned edit does better than no edit


def test_saving_replaces_only_a_hypernetwork_folder(tiny, tmp_path):
    model, tok = tiny
    net, record = train_mend(model, tok, REQUESTS * 2, dataclasses.replace(TRAIN, steps=1))
    path = save_hypernet(tmp_path / "mend", net, record)
    save_hypernet(path, net, record, overwrite=True)
    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    with pytest.raises(CrispEditError, match="not a MEND hypernetwork folder"):
        save_hypernet(other, net, record, overwrite=True)
    assert (other / "keep.txt").read_text() == "mine"
