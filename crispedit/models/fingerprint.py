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
