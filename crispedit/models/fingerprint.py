"""Identify a model and the exact values of its targeted weights.

Caches (K-FAC factors) and edit artifacts record these so that they are never silently applied to a
different model, or to weights that changed since they were computed. The config hash leaves out
keys that change with how a model was loaded or saved (path, dtype, library version, quantisation of
the source file, runtime output flags) but not what it computes.
"""

from __future__ import annotations

import hashlib
from typing import Any, Sequence

import torch
from torch import nn

from crispedit.errors import CrispEditError
from crispedit.io import sha256_json
from crispedit.models.targets import is_editable_layer, weight_matrix

VOLATILE_CONFIG_KEYS = frozenset({
    "_name_or_path", "name_or_path", "_commit_hash", "architectures",
    "torch_dtype", "dtype", "transformers_version", "quantization_config",
    "_attn_implementation", "_attn_implementation_autoset", "attn_implementation",
    "_experts_implementation", "use_cache", "output_attentions", "output_hidden_states",
    "return_dict", "torchscript",
})


def _stable_config(obj: Any) -> Any:
    """The config dict without volatile keys, recursively (composite models nest sub-configs)."""
    if isinstance(obj, dict):
        return {k: _stable_config(v) for k, v in obj.items() if k not in VOLATILE_CONFIG_KEYS}
    if isinstance(obj, (list, tuple)):
        return [_stable_config(v) for v in obj]
    return obj


def config_hash(model: nn.Module) -> str:
    """sha256 of the model's config without volatile keys (same architecture and sizes -> same hash)."""
    config = getattr(model, "config", None)
    if config is None:
        raise CrispEditError(f"{type(model).__name__} has no Hugging Face config to identify it by")
    return sha256_json(_stable_config(config.to_dict()))


def model_identity(model: nn.Module) -> dict[str, Any]:
    """Who this model is: type, name or path, architectures, config hash, vocabulary size, parameter count.

    `name_or_path` is the name the user loaded it by (crispedit's `load_model` records it), else the
    Hugging Face `name_or_path`.
    """
    config = getattr(model, "config", None)
    if config is None:
        raise CrispEditError(f"{type(model).__name__} has no Hugging Face config to identify it by")
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    vocab = getattr(embeddings, "num_embeddings", None) or getattr(config, "vocab_size", None)
    first = next(model.parameters(), None)
    return {
        "model_type": getattr(config, "model_type", None),
        "name_or_path": getattr(model, "crispedit_display_name", None) or getattr(model, "name_or_path", None)
        or getattr(config, "_name_or_path", None),
        "architectures": list(getattr(config, "architectures", None) or [type(model).__name__]),
        "config_sha256": config_hash(model),
        "vocab_size": int(vocab) if vocab is not None else None,
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "dtype": str(first.dtype).removeprefix("torch.") if first is not None else None,
    }


def weights_fingerprint(model: nn.Module, target_names: Sequence[str]) -> str:
    """sha256 over the targeted layers' names, shapes and float32 values (weight `[d_out, d_in]`, then bias).

    The order of `target_names` matters (it is the order factors and edits are stored in). Values are
    converted to float32 on the CPU, so the same weights on another device hash the same.
    """
    if not target_names:
        raise CrispEditError("no target layers to fingerprint")
    modules = dict(model.named_modules())
    h = hashlib.sha256()
    for name in target_names:
        module = modules.get(name)
        if module is None or not is_editable_layer(module):
            raise CrispEditError(f"target layer {name!r} is not a Linear/Conv1D module of this model")
        tensors = [("weight", weight_matrix(module))]
        if module.bias is not None:
            tensors.append(("bias", module.bias.detach()))
        for kind, t in tensors:
            values = t.to(device="cpu", dtype=torch.float32).contiguous().numpy()
            h.update(f"{name}.{kind}:{list(values.shape)}\n".encode())
            h.update(values.tobytes())
    return h.hexdigest()


def all_weights_fingerprint(model: nn.Module) -> str:
    """sha256 over every entry of the model's state dict (names, shapes and values; floating values as
    float32 on the CPU, so the same weights hash the same on any device). K-FAC statistics depend on all
    of them: A on the layers below a target, S and the sampled labels on the layers above it."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        t = t.detach()
        values = t.to(device="cpu", dtype=torch.float32) if t.is_floating_point() else t.to("cpu")
        h.update(f"{name}:{list(values.shape)}:{values.dtype}\n".encode())
        h.update(values.contiguous().view(torch.uint8).numpy().tobytes() if values.numel() else b"")
    return h.hexdigest()


def tied_with(model: nn.Module, name: str) -> list[str]:
    """Other parameters that share the weight of layer `name` (e.g. `model.embed_tokens.weight` for a tied
    `lm_head`): an edit of `name` would change them as well."""
    module = model.get_submodule(name)
    w = getattr(module, "weight", None)
    if w is None:
        return []
    ptr = w.data_ptr()
    return [n for n, p in model.named_parameters(remove_duplicate=False)
            if not n.startswith(f"{name}.") and (p is w or (p.numel() and p.data_ptr() == ptr))]


def check_untied(model: nn.Module, targets: Sequence[str]) -> None:
    """Refuse target layers whose weight is tied to another parameter (a tied LM head is the input
    embedding: editing it silently changes how every input token is read)."""
    for name in targets:
        others = tied_with(model, name)
        if others:
            raise CrispEditError(f"target layer {name!r} shares its weight with {', '.join(others)} (tied "
                                 "embeddings): editing it would change those too; choose other layers")
