"""The baselines' public surface: one entry point, validation in one line before any model, configs the CLI can
be generated from, subject location."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from baselines_tiny import REQUESTS, TARGETS, tiny_curvature, tiny_model

from crispedit.baselines import METHODS, config_class, run_baseline, validate
from crispedit.baselines.keys import block_of, is_down_projection, locate, subject_span
from crispedit.data.records import EditRequest
from crispedit.errors import CrispEditError


def _one_line(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg
    return msg


@pytest.mark.parametrize("name", METHODS)
def test_every_config_field_has_a_default_and_help(name):
    cls = config_class(name)
    cfg = cls()
    assert dataclasses.is_dataclass(cfg)
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(cfg, dataclasses.fields(cls)[0].name, None)
    for f in dataclasses.fields(cls):
        assert f.default is not dataclasses.MISSING, f.name
        assert f.metadata.get("help"), f.name
    assert cls.from_dict(cfg.to_dict()) == cfg  # JSON round trip (what the delta record stores)


def test_bad_config_values_name_the_field():
    with pytest.raises(ValueError, match=r"MemitConfig\.mom2_weight must be a positive number, got -1"):
        config_class("memit")(mom2_weight=-1)
    with pytest.raises(ValueError, match=r"MemitConfig\.chunk_size"):
        config_class("memit")(chunk_size=0)
    with pytest.raises(ValueError, match=r"MendConfig\.batch_size"):
        config_class("mend")(batch_size=0)


def test_validate_gives_one_line_errors_before_any_model(tmp_path):
    with pytest.raises(CrispEditError) as e:
        validate("rome", REQUESTS)
    assert "expected one of alphaedit, memit, mend, ultraedit" in _one_line(e)
    for name in ("memit", "alphaedit"):
        with pytest.raises(CrispEditError) as e:
            validate(name, REQUESTS)
        assert "needs a curvature cache" in _one_line(e)
    with pytest.raises(CrispEditError) as e:
        validate("memit", REQUESTS, curvature=tmp_path / "nope")
    assert "does not exist" in _one_line(e)
    record = {"targets": [{"name": t} for t in TARGETS], "model": {"model_type": "llama"}}
    validate("memit", REQUESTS, curvature=record)
    no_subject = [REQUESTS[0], EditRequest("The Louvre is in", "Rome", case_id="7")]
    with pytest.raises(CrispEditError) as e:
        validate("alphaedit", no_subject, curvature=record)
    assert _one_line(e).startswith("request 1 (case_id=7): field 'subject' is missing")
    elsewhere = [EditRequest("The Louvre is in", "Rome", subject="Paris", case_id="8")]
    with pytest.raises(CrispEditError) as e:
        validate("memit", elsewhere, curvature=record)
    assert "field 'subject' 'Paris' does not occur in field 'prompt'" in _one_line(e)
    validate("ultraedit", no_subject)  # UltraEdit needs neither a subject nor a cache
    attn = {"targets": [{"name": "model.layers.1.self_attn.o_proj"}], "model": {"model_type": "llama"}}
    with pytest.raises(CrispEditError) as e:
        validate("memit", REQUESTS, curvature=attn)
    assert "is not one; choose layers like 'model.layers.N.mlp.down_proj'" in _one_line(e)
    with pytest.raises(CrispEditError) as e:
        validate("alphaedit", REQUESTS, curvature=record, targets=["model.layers.3.mlp.down_proj"])
    assert "not in the curvature cache" in _one_line(e)
    with pytest.raises(CrispEditError) as e:
        validate("mend", REQUESTS)
    assert "needs a trained hypernetwork" in _one_line(e)


def test_run_baseline_validates_first_and_leaves_the_model_alone(byte_bpe_tokenizer):
    model = tiny_model(byte_bpe_tokenizer)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CrispEditError, match="needs a curvature cache"):
        run_baseline("memit", model, byte_bpe_tokenizer, REQUESTS, None)
    cur = tiny_curvature(model, byte_bpe_tokenizer)
    with pytest.raises(CrispEditError, match="field 'subject' is missing"):
        run_baseline("alphaedit", model, byte_bpe_tokenizer, [EditRequest("The Louvre is in", "Rome")], cur)
    with pytest.raises(CrispEditError, match="takes a MemitConfig"):
        run_baseline("memit", model, byte_bpe_tokenizer, REQUESTS, cur, config_class("alphaedit")())
    assert all((before[k] == v).all() for k, v in model.state_dict().items())


def test_subject_is_located_on_the_tokens_the_model_sees(byte_bpe_tokenizer):
    tok = byte_bpe_tokenizer
    r = EditRequest("The mother tongue of Danielle Darrieux is", "German", subject="Danielle Darrieux")
    span = subject_span(r)
    assert r.prompt[span[0]:span[1]] == "Danielle Darrieux"
    for prefix in ("", "Because of this. "):
        loc = locate(tok, prefix, r.prompt, span)
        assert loc.ids == tok(prefix + r.prompt)["input_ids"]
        # the located token ends the subject: decoding up to it covers the subject, one token fewer does not
        assert tok.decode(loc.ids[: loc.subject_last + 1]).endswith("Darrieux")
        assert not tok.decode(loc.ids[: loc.subject_last]).endswith("Darrieux")


def test_layer_helpers():
    assert block_of("model.layers.12.mlp.down_proj") == "model.layers.12"
    assert block_of("transformer.h.3.mlp.c_proj") == "transformer.h.3"
    assert is_down_projection("model.layers.12.mlp.down_proj", "llama")
    assert is_down_projection("transformer.h.3.mlp.c_proj")
    assert not is_down_projection("model.layers.12.mlp.up_proj", "llama")
    assert not is_down_projection("transformer.h.3.mlp.c_proj", "llama")


def test_edit_model_with_a_baseline_config_is_run_baseline(byte_bpe_tokenizer):
    """`edit_model(..., config=MemitConfig(...))` makes the same edit as `run_baseline("memit", ...)`, bit for bit,
    and returns it as an EditResult whose delta reverts the model."""
    from crispedit import edit_model
    from crispedit.baselines.config import MemitConfig

    cfg = MemitConfig(v_steps=3, context_prefixes=0)
    a = tiny_model(byte_bpe_tokenizer)
    cur = tiny_curvature(a, byte_bpe_tokenizer)
    before = {k: v.clone() for k, v in a.state_dict().items()}
    res = edit_model(a, byte_bpe_tokenizer, REQUESTS, cur, cfg)
    b = tiny_model(byte_bpe_tokenizer)
    delta = run_baseline("memit", b, byte_bpe_tokenizer, REQUESTS, cur, cfg)
    assert res.stopped == "closed-form" and res.steps == 0
    assert set(res.delta.deltas) == set(delta.deltas) == set(TARGETS)
    for n in TARGETS:
        assert res.delta.deltas[n].abs().max() > 0 and torch.equal(res.delta.deltas[n], delta.deltas[n])
    res.delta.revert(a)
    assert all(torch.equal(before[k], v) for k, v in a.state_dict().items())
    with pytest.raises(CrispEditError, match="takes an EditConfig or a baseline config"):
        edit_model(a, byte_bpe_tokenizer, REQUESTS, cur, object())
