"""Target-layer selection and the layout-independent weight view, on tiny Llama and GPT-2 models."""

from __future__ import annotations

import types

import pytest
import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM
from transformers.pytorch_utils import Conv1D

from crispedit.errors import CrispEditError
from crispedit.models.targets import (
    DEFAULT_TARGETS,
    NoTargetModulesError,
    default_layer_indices,
    expand_template,
    grad_matrix,
    layer_io_dims,
    list_linear_layers,
    resolve_targets,
    set_grad_matrix,
    set_weight_matrix,
    split_target_items,
    weight_matrix,
)


def tiny_llama(layers: int = 2) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, bos_token_id=1, eos_token_id=2)
    return LlamaForCausalLM(config).eval()


def tiny_gpt2(layers: int = 3) -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=layers, n_head=4,
                        bos_token_id=1, eos_token_id=2)
    return GPT2LMHeadModel(config).eval()


@pytest.fixture(scope="module")
def llama() -> LlamaForCausalLM:
    return tiny_llama()


@pytest.fixture(scope="module")
def gpt2() -> GPT2LMHeadModel:
    return tiny_gpt2()


# ------------------------------------------------------------------ listing

def test_list_linear_layers_llama(llama):
    layers = {info.name: info for info in list_linear_layers(llama)}
    assert len(layers) == 2 * 7 + 1  # q, k, v, o, gate, up, down per layer + lm_head
    down = layers["model.layers.1.mlp.down_proj"]
    assert (down.kind, down.d_in, down.d_out, down.has_bias) == ("linear", 48, 32, False)
    k = layers["model.layers.0.self_attn.k_proj"]
    assert (k.d_in, k.d_out) == (32, 16)  # 2 KV heads of size 8
    names = [info.name for info in list_linear_layers(llama)]
    assert names == [n for n, m in llama.named_modules() if isinstance(m, nn.Linear)]


def test_list_linear_layers_gpt2_conv1d(gpt2):
    layers = {info.name: info for info in list_linear_layers(gpt2)}
    c_fc = layers["transformer.h.0.mlp.c_fc"]
    assert (c_fc.kind, c_fc.d_in, c_fc.d_out, c_fc.has_bias) == ("conv1d", 32, 128, True)
    c_proj = layers["transformer.h.2.mlp.c_proj"]
    assert (c_proj.kind, c_proj.d_in, c_proj.d_out) == ("conv1d", 128, 32)
    c_attn = layers["transformer.h.1.attn.c_attn"]
    assert (c_attn.d_in, c_attn.d_out) == (32, 96)
    assert layers["lm_head"].kind == "linear"


# ------------------------------------------------------------------ parsing

def test_split_target_items_keeps_commas_inside_braces_and_brackets():
    spec = r"model.layers.{10-12,20}.mlp.down_proj, re:model\.layers\.\d{1,2}\.mlp\.[ud],, x.{1,3}.y"
    assert split_target_items(spec) == [
        "model.layers.{10-12,20}.mlp.down_proj",
        r"re:model\.layers\.\d{1,2}\.mlp\.[ud]",
        "x.{1,3}.y",
    ]


@pytest.mark.parametrize("item, expected", [
    ("a.{10-12}.b", ["a.10.b", "a.11.b", "a.12.b"]),
    ("a.{1,3,5}.b", ["a.1.b", "a.3.b", "a.5.b"]),
    ("a.{10-12,20}.b", ["a.10.b", "a.11.b", "a.12.b", "a.20.b"]),
    ("a.{ 4 - 5 }.b", ["a.4.b", "a.5.b"]),
    ("a.{0,1}.b.{2}", ["a.0.b.2", "a.1.b.2"]),
    ("plain.name", ["plain.name"]),
], ids=["range", "list", "mixed", "spaces", "two-groups", "no-template"])
def test_expand_template(item, expected):
    assert expand_template(item) == expected


@pytest.mark.parametrize("item", ["a.{3-1}.b", "a.{x}.b", "a.{}.b", "a.{1-}.b", "a.{1.b"],
                         ids=["reversed", "letters", "empty", "open-range", "unbalanced"])
def test_bad_templates_are_errors(item, llama):
    with pytest.raises(CrispEditError, match="range|brace|no module"):
        resolve_targets(llama, item)


# ------------------------------------------------------------------ resolution

def test_full_name_and_template(llama):
    assert resolve_targets(llama, "model.layers.1.mlp.down_proj") == ["model.layers.1.mlp.down_proj"]
    expected = ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    assert resolve_targets(llama, "model.layers.{0-1}.mlp.down_proj") == expected
    assert resolve_targets(llama, "model.layers.{0,1}.mlp.down_proj") == expected


def test_comma_list_is_returned_in_model_order_without_duplicates(llama):
    spec = "model.layers.{0,1}.mlp.down_proj, model.layers.0.self_attn.q_proj, model.layers.1.mlp.down_proj"
    assert resolve_targets(llama, spec) == [
        "model.layers.0.self_attn.q_proj",
        "model.layers.0.mlp.down_proj",
        "model.layers.1.mlp.down_proj",
    ]
    as_list = ["model.layers.1.mlp.down_proj", "model.layers.0.self_attn.q_proj,model.layers.0.mlp.down_proj"]
    assert resolve_targets(llama, as_list) == resolve_targets(llama, spec)


def test_regex_explicit_and_implicit(llama):
    expected = ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    assert resolve_targets(llama, r"re:model\.layers\.\d+\.mlp\.down_proj") == expected
    assert resolve_targets(llama, r".*down_proj") == expected  # metacharacters make it a regex
    # Fully matched: "mlp" alone would match nothing; a prefix must be spelled out.
    assert resolve_targets(llama, r"re:model\.layers\.1\.mlp\..*") == [
        "model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj", "model.layers.1.mlp.down_proj"]
    assert resolve_targets(llama, r"model\.layers\.[01]\.self_attn\.(q|k)_proj") == [
        "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj",
        "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.k_proj"]
    # regex and template overlapping: deduplicated
    assert resolve_targets(llama, r"model.layers.{0-1}.mlp.down_proj, .*\.1\.mlp\.down_proj") == expected


def test_regex_matching_nothing_is_an_error(llama):
    with pytest.raises(NoTargetModulesError, match="matches no Linear"):
        resolve_targets(llama, r"re:mlp")
    with pytest.raises(NoTargetModulesError, match="matches no Linear"):
        resolve_targets(llama, r"re:model\.layers\.\d+\.mlp")  # matches modules, but no Linear ones
    with pytest.raises(CrispEditError, match="invalid regex"):
        resolve_targets(llama, r"re:model\.layers\.(")


def test_unknown_name_lists_five_closest_linear_layers(llama):
    with pytest.raises(NoTargetModulesError) as info:
        resolve_targets(llama, "model.layers.1.mlp.down_prj")
    message = str(info.value)
    assert "'model.layers.1.mlp.down_prj'" in message
    closest = message.split("closest layers: ")[1].split(", ")
    assert len(closest) == 5
    assert closest[0] == "model.layers.1.mlp.down_proj"
    assert all(name in dict(llama.named_modules()) for name in closest)
    assert isinstance(info.value, ValueError) and isinstance(info.value, CrispEditError)


def test_range_past_the_last_layer_is_an_error(llama):
    with pytest.raises(NoTargetModulesError, match=r"model\.layers\.2\.mlp\.down_proj"):
        resolve_targets(llama, "model.layers.{0-2}.mlp.down_proj")


def test_non_linear_module_is_an_error_that_says_what_it_is(llama):
    with pytest.raises(CrispEditError, match=r"LlamaMLP, not a Linear.*model\.layers\.0\.mlp\.gate_proj"):
        resolve_targets(llama, "model.layers.0.mlp")
    with pytest.raises(CrispEditError, match="LlamaRMSNorm, not a Linear"):
        resolve_targets(llama, "model.layers.0.input_layernorm")


def test_empty_spec_is_an_error(llama):
    with pytest.raises(CrispEditError, match="empty"):
        resolve_targets(llama, " , ")


# ------------------------------------------------------------------ defaults

@pytest.mark.parametrize("layers, expected", [(30, [4, 5, 6]), (12, [2, 3, 4]), (24, [3, 4, 5]),
                                              (28, [4, 5, 6]), (32, [4, 5, 6]), (3, [0, 1, 2]), (2, [0, 1]), (1, [0])])
def test_default_layer_indices(layers, expected):
    assert default_layer_indices(layers) == expected


def test_default_targets_llama_30_layers():
    model = LlamaForCausalLM(LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=8, num_hidden_layers=30,
                                         num_attention_heads=2, num_key_value_heads=1))
    assert resolve_targets(model) == [f"model.layers.{i}.mlp.down_proj" for i in (4, 5, 6)]


def test_default_targets_gpt2_mlp_c_proj():
    model = tiny_gpt2(layers=6)
    assert resolve_targets(model) == [f"transformer.h.{i}.mlp.c_proj" for i in (1, 2, 3)]
    assert all(isinstance(model.get_submodule(n), Conv1D) for n in resolve_targets(model))


def test_defaults_table_can_be_overridden(llama):
    assert resolve_targets(llama, defaults={"llama": "model.layers.{}.mlp.up_proj"}) == [
        "model.layers.0.mlp.up_proj", "model.layers.1.mlp.up_proj"]
    # a template without "{}" is used as a target spec as is
    assert resolve_targets(llama, defaults={"llama": "model.layers.{1}.self_attn.o_proj"}) == [
        "model.layers.1.self_attn.o_proj"]
    assert DEFAULT_TARGETS["llama"] == "model.layers.{}.mlp.down_proj"  # the module table is untouched


class _Custom(nn.Module):
    def __init__(self, model_type: str | None):
        super().__init__()
        if model_type is not None:
            self.config = types.SimpleNamespace(model_type=model_type)
        self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4)) for _ in range(4)])


def test_unknown_model_type_without_spec_asks_for_layers():
    # The library names its own parameter (`targets=`); the CLI spells the same hint as --layers.
    with pytest.raises(CrispEditError, match="targets=") as e:
        resolve_targets(_Custom("my_arch"))
    assert e.value.hint == {"targets": "model.layers.{10-12}.mlp.down_proj"}
    with pytest.raises(CrispEditError, match="targets="):
        resolve_targets(_Custom(None))
    # ... and a user table entry makes it work
    assert resolve_targets(_Custom("my_arch"), defaults={"my_arch": "blocks.{}.2"}) == [
        "blocks.1.2", "blocks.2.2", "blocks.3.2"]


def test_default_template_matching_no_module_is_an_error(llama):
    with pytest.raises(CrispEditError, match="matches no module"):
        resolve_targets(llama, defaults={"llama": "transformer.h.{}.mlp.c_proj"})


# ------------------------------------------------------------------ weight view

def _modules_under_test():
    torch.manual_seed(1)
    linear = nn.Linear(5, 3).double()
    conv = Conv1D(3, 5).double()  # Conv1D(nf=d_out, nx=d_in)
    nn.init.normal_(conv.weight)
    nn.init.normal_(conv.bias)
    return [("linear", linear), ("conv1d", conv)]


@pytest.mark.parametrize("kind, module", _modules_under_test(), ids=["linear", "conv1d"])
def test_weight_matrix_orientation_matches_forward(kind, module):
    assert layer_io_dims(module) == (5, 3)
    W = weight_matrix(module)
    assert W.shape == (3, 5)
    x = torch.randn(7, 5, dtype=torch.float64)
    torch.testing.assert_close(module(x), x @ W.T + module.bias, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind, module", _modules_under_test(), ids=["linear", "conv1d"])
def test_set_weight_matrix_changes_forward(kind, module):
    W_new = torch.randn(3, 5, dtype=torch.float64)
    set_weight_matrix(module, W_new)
    x = torch.randn(4, 5, dtype=torch.float64)
    torch.testing.assert_close(module(x), x @ W_new.T + module.bias, rtol=1e-12, atol=1e-12)
    # the view shares storage with the parameter
    with torch.no_grad():
        weight_matrix(module)[0, 0] += 1.0
    assert weight_matrix(module)[0, 0] == W_new[0, 0] + 1.0
    with pytest.raises(ValueError, match="shape"):
        set_weight_matrix(module, W_new.T)


@pytest.mark.parametrize("kind, module", _modules_under_test(), ids=["linear", "conv1d"])
def test_grad_matrix_is_dL_dW_in_out_in_orientation(kind, module):
    module.zero_grad()
    assert grad_matrix(module) is None
    x = torch.randn(6, 5, dtype=torch.float64)
    c = torch.randn(6, 3, dtype=torch.float64)
    (module(x) * c).sum().backward()
    torch.testing.assert_close(grad_matrix(module), c.T @ x, rtol=1e-12, atol=1e-12)  # dL/dW = c^T x
    G = torch.randn(3, 5, dtype=torch.float64)
    set_grad_matrix(module, G)
    torch.testing.assert_close(grad_matrix(module), G, rtol=0, atol=0)
    assert module.weight.grad.shape == module.weight.shape


def test_weight_view_on_real_gpt2_layer(gpt2):
    module = gpt2.get_submodule("transformer.h.0.mlp.c_fc")
    x = torch.randn(2, 32)
    torch.testing.assert_close(module(x), x @ weight_matrix(module).T + module.bias, rtol=1e-5, atol=1e-5)


def test_weight_view_rejects_other_modules():
    with pytest.raises(TypeError, match="LayerNorm"):
        weight_matrix(nn.LayerNorm(4))
