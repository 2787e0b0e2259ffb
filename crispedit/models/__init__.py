"""Models: loading (embedded SmolLM2, GGUF, local, hub), target-layer selection, fingerprints."""

from crispedit.models.fingerprint import model_identity, weights_fingerprint
from crispedit.models.home import crispedit_home
from crispedit.models.loading import EMBEDDED_MODEL, ResolvedModel, load_model, resolve_model_spec, save_model
from crispedit.models.targets import (
    DEFAULT_TARGETS,
    LayerInfo,
    NoTargetModulesError,
    grad_matrix,
    layer_io_dims,
    list_linear_layers,
    resolve_targets,
    set_grad_matrix,
    set_weight_matrix,
    weight_matrix,
)

__all__ = [
    "DEFAULT_TARGETS",
    "EMBEDDED_MODEL",
    "LayerInfo",
    "NoTargetModulesError",
    "ResolvedModel",
    "crispedit_home",
    "grad_matrix",
    "layer_io_dims",
    "list_linear_layers",
    "load_model",
    "model_identity",
    "resolve_model_spec",
    "resolve_targets",
    "save_model",
    "set_grad_matrix",
    "set_weight_matrix",
    "weight_matrix",
]
