"""The public facade (crispedit/__init__.py): a sorted `__all__` of importable names, lazy imports, and the
README's Python example, run verbatim on a tiny model (the model loader and the corpus size are shrunk by
monkeypatching the facade's names the example imports)."""

from __future__ import annotations

import json
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import crispedit

README = Path(__file__).resolve().parents[1] / "README.md"
WORDS = ("the cat sat on a mat and Paris is the capital of France while Rome has the Colosseum "
         "Shakespeare wrote Hamlet answer question yes no").split()
EDITS = [
    {"prompt": "The capital of France is", "target": "Rome", "rephrases": ["France's capital is"],
     "locality": [{"prompt": "The Colosseum is in", "answer": "Rome"}]},
    {"prompt": "Hamlet was written by", "target": "the cat", "locality": [{"prompt": "The cat sat on"}]},
]


def test_all_is_sorted_importable_and_small():
    names = crispedit.__all__
    assert names == sorted(names) and len(names) == len(set(names)) and len(names) <= 30
    for name in names:
        assert getattr(crispedit, name) is not None, name
    from crispedit.curvature.api import collect_curvature
    from crispedit.editing.run import edit_model

    assert crispedit.collect_curvature is collect_curvature and crispedit.edit_model is edit_model
    with pytest.raises(AttributeError):
        crispedit.no_such_name  # noqa: B018


def test_import_crispedit_is_lazy():
    code = "import sys, crispedit; print(crispedit.__all__ == sorted(crispedit.__all__), 'torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.split() == ["True", "False"], done.stderr


def readme_python_example() -> str:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)
    examples = [b for b in blocks if "from crispedit import" in b]
    assert len(examples) == 1, "the README should have one Python example using the facade"
    return examples[0]


def test_readme_example_uses_only_the_facade():
    code = readme_python_example()
    imports = re.findall(r"^\s*(?:from|import)\s+([\w.]+)", code, flags=re.M)
    assert imports == ["crispedit"], imports
    names = re.search(r"from crispedit import \((.*?)\)", code, flags=re.S).group(1)
    assert {n.strip() for n in names.split(",") if n.strip()} <= set(crispedit.__all__)


@pytest.fixture
def tiny_world(tmp_path, monkeypatch, byte_bpe_tokenizer):
    """The README's world, small: `load_model` gives a tiny Llama (same weights on every call), `build_corpus`
    reads a tiny text corpus in chunks of ≤ 24 tokens, and edits.json sits in the working folder."""
    from conftest import save_tiny_model
    from crispedit.data.corpus import build_corpus
    from crispedit.models.loading import load_model

    rng = random.Random(0)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 20)))
                                for _ in range(80)) + "\n")
    folder = save_tiny_model(tmp_path / "tiny", byte_bpe_tokenizer, seed=0)

    def small_model(spec, **kw):
        return load_model(str(folder), **kw)

    def small_corpus(tokenizer, source=None, n_samples=None, max_length=256, **kw):
        return build_corpus(tokenizer, str(corpus), min(n_samples or 4, 4), min(max_length, 24), **kw)

    monkeypatch.setattr(crispedit, "load_model", small_model)
    monkeypatch.setattr(crispedit, "build_corpus", small_corpus)
    work = tmp_path / "work"
    work.mkdir()
    (work / "edits.json").write_text(json.dumps(EDITS))
    monkeypatch.chdir(work)
    return work, folder


def test_readme_python_example_runs_verbatim(tiny_world, capsys):
    from crispedit.models.loading import load_model

    work, folder = tiny_world
    namespace: dict = {}
    exec(compile(readme_python_example(), str(README), "exec"), namespace)  # noqa: S102 - our own README
    assert (work / "cache" / "curvature.json").is_file() and (work / "delta" / "delta.json").is_file()
    out = capsys.readouterr().out
    assert "A top-1" in out and "model.layers.0.mlp.down_proj" in out  # cur.summary()
    report = namespace["report"]
    assert report.summary["reliability_gen_qa"] is not None and report.summary["kl_nats_per_token"] >= 0.0
    assert namespace["res"].steps > 0
    # The revert at the end restores the base model bit for bit.
    model, fresh = namespace["model"], load_model(str(folder))[0]
    for (name, p), q in zip(model.named_parameters(), fresh.parameters()):
        assert torch.equal(p, q), name
    delta = crispedit.EditDelta.load(work / "delta")
    delta.apply(model)
    assert not torch.equal(model.model.layers[0].mlp.down_proj.weight, fresh.model.layers[0].mlp.down_proj.weight)


def test_collect_curvature_is_compute_on_the_configured_targets(tiny_world):
    from crispedit.curvature.api import Curvature
    from crispedit.curvature.extend import corpus_record

    model, tok = crispedit.load_model("tiny")
    corpus = crispedit.build_corpus(tok, n_samples=4, max_length=24)
    cfg = crispedit.CurvatureConfig(targets="model.layers.1.mlp.down_proj", labels="empirical")
    cur = crispedit.collect_curvature(model, corpus, cfg)
    ref = Curvature.compute(model, ["model.layers.1.mlp.down_proj"], corpus.sequences, corpus_record(corpus), cfg)
    assert cur.targets == ["model.layers.1.mlp.down_proj"] and cur.record["corpora"] == ref.record["corpora"]
    assert torch.equal(cur.stats[cur.targets[0]].S, ref.stats[cur.targets[0]].S)
    assert cur.record["collection"] == cfg.collection_record() and cur.config == cfg.replace(targets=None)
    assert cur.masks(0.9) is cur.masks(0.9)  # built once per (γ, scope)


def test_edit_model_checks_method_targets_and_weights(tiny_world):
    model, tok = crispedit.load_model("tiny")
    requests = crispedit.load_requests("edits.json")
    with pytest.raises(crispedit.CrispEditError, match=r"needs a curvature; pass curvature=\.\.\.") as e:
        crispedit.edit_model(model, tok, requests, None, crispedit.EditConfig())
    assert e.value.hint == {"curvature": ...}
    corpus = crispedit.build_corpus(tok, n_samples=4, max_length=24)
    cur = crispedit.collect_curvature(model, corpus, crispedit.CurvatureConfig(labels="empirical"))
    with pytest.raises(crispedit.CrispEditError, match="targets='model.layers.0.mlp.down_proj' selects"):
        crispedit.edit_model(model, tok, requests, cur, targets="model.layers.0.mlp.down_proj")
    other, _ = crispedit.load_model("tiny")
    with torch.no_grad():
        other.model.layers[1].mlp.down_proj.weight.add_(1e-3)
    with pytest.raises(crispedit.CacheMismatchError, match="allow_mismatch=True") as e:
        crispedit.edit_model(other, tok, requests, cur)
    assert any("weights_sha256" in d for d in e.value.diffs)
    res = crispedit.edit_model(other, tok, requests, cur, crispedit.EditConfig(epochs=2), allow_mismatch=True)
    assert res.steps == 2
    ft = crispedit.edit_model(model, tok, requests, None, crispedit.EditConfig(method="ft", epochs=1),
                              targets="model.layers.0.mlp.down_proj")
    assert ft.delta.targets == ["model.layers.0.mlp.down_proj"]
    with pytest.raises(crispedit.ConfigError, match="chat template"):
        crispedit.edit_model(model, tok, requests, cur, crispedit.EditConfig(contexts=("chat",)))


def test_extend_from_corpus_adds_only_unseen_sequences(tiny_world):
    model, tok = crispedit.load_model("tiny")
    work, _ = tiny_world
    corpus_file = work.parent / "corpus.txt"
    from crispedit.data.corpus import build_corpus

    corpus = build_corpus(tok, str(corpus_file), 4, 24)
    cur = crispedit.collect_curvature(model, corpus, crispedit.CurvatureConfig(labels="empirical"))
    more = cur.extend_from_corpus(model, tok, n_samples=3)
    new = more.record["corpora"][-1]
    assert new["excluded_previous"] and new["n_excluded"] == 4 and new["seed"] == 1 and new["max_length"] == 24
    # Every new sequence's first token is an attention sink, summed apart from A and S.
    assert more.stats.n_tokens == cur.stats.n_tokens + new["n_tokens"] - new["n_samples"]
    with pytest.raises(crispedit.ConfigError, match="heldout_fraction=0.3 differs"):
        cur.extend_from_corpus(model, tok, n_samples=1, heldout_fraction=0.3)
