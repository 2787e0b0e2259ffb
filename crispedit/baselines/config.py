"""The baselines' configs: frozen, validated dataclasses (`crispedit.config.option` fields, so each field is a
documented, checked `crispedit edit` flag) and the method names. Torch-free, like `crispedit.config`: the command
line builds its parser from this module without importing torch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from crispedit.config import Choice, ConfigBase, option

if TYPE_CHECKING:
    from crispedit.baselines.values import ValueSettings


class Covariance(Choice):
    """Which of the cache's input factors is the key covariance C."""

    ALL_TOKENS = "all_tokens"  # sink-inclusive A: every token, as MEMIT's own statistics
    WITHOUT_SINK = "without_sink"  # A without each sequence's first position


@dataclass(frozen=True)
class LocateEditConfig(ConfigBase):
    """What MEMIT and AlphaEdit share: the target-value optimisation, the context prefixes, the chunking."""

    v_steps: int = option(25, "Adam steps of the target-value optimisation", low=1)
    v_lr: float = option(0.5, "Adam learning rate of the target-value optimisation", low=0.0, low_open=True)
    v_weight_decay: float = option(0.5, "weight of the ‖δ‖/‖h‖² penalty on the residual change", low=0.0)
    clamp_norm_factor: float = option(0.75, "‖δ‖ is clamped to this multiple of ‖h‖ after each step", low=0.0,
                                      low_open=True)
    kl_factor: float = option(0.0625, "weight of the KL term keeping '{subject} is a' unchanged", low=0.0)
    v_early_stop: float = option(0.05, "stop a request's value optimisation below this loss", low=0.0)
    context_prefixes: int = option(5, "model-written context prefixes, one per opening word (0 = raw prompt only)",
                                   low=0, high=100)
    context_length: int = option(10, "tokens per context prefix, opening word included", low=2)
    chunk_size: int | None = option(None, "sequential variant: edit this many requests at a time on the model "
                                          "edited so far (none = all at once)", low=1)
    group_size: int = option(8, "requests whose values are optimised in one batch (speed only; same results)",
                             low=1)
    seed: int = option(0, "seed of the context-prefix sampling", low=0)

    def value_settings(self) -> "ValueSettings":
        from crispedit.baselines.values import ValueSettings

        return ValueSettings(steps=self.v_steps, lr=self.v_lr, weight_decay=self.v_weight_decay,
                             clamp_norm_factor=self.clamp_norm_factor, kl_factor=self.kl_factor,
                             early_stop_loss=self.v_early_stop, group_size=self.group_size)


@dataclass(frozen=True)
class MemitConfig(LocateEditConfig):
    """MEMIT's hyper-parameters; defaults from the reference implementation's GPT-J/Llama-3 settings (25 value
    steps, clamp 0.75, KL 0.0625, weight decay 0.5, v_lr = 0.5 as for GPT-J) except λ = 1,500, measured on
    SmolLM2: the reference's 15,000 (for d_in = 14,336 on Llama-3-8B; the mean eigenvalue of C scales as
    1/d_in, and SmolLM2's d_in is 1,536) leaves 12 CounterFact edits at 8 % teacher-forced reliability
    (layers 10-12), 1,500 writes all of them (held-out KL 0.005 nats/token)."""

    mom2_weight: float = option(1500.0, "λ, the weight of the key covariance C = E[kkᵀ] (MEMIT's "
                                        "mom2_update_weight)", low=0.0, low_open=True)
    covariance: Covariance = option(Covariance.ALL_TOKENS, "which cache A is C: all_tokens (sink-inclusive, as "
                                                           "MEMIT counts every token) or without_sink")


@dataclass(frozen=True)
class AlphaEditConfig(LocateEditConfig):
    """AlphaEdit's hyper-parameters; defaults from the reference implementation's Llama-3 settings
    (null-space threshold 2e-2, α = 10, value optimisation as MEMIT) except v_lr (MEMIT's GPT-J 0.5)."""

    null_threshold: float = option(2e-2, "eigenvalues of C = E[kkᵀ] below this (absolute) span the null space the "
                                         "update is kept in", low=0.0, low_open=True)
    l2: float = option(10.0, "α, the ridge weight on the projected update", low=0.0, low_open=True)
    covariance: Covariance = option(Covariance.ALL_TOKENS, "which cache A is C: all_tokens (sink-inclusive) or "
                                                           "without_sink")


@dataclass(frozen=True)
class UltraEditConfig(ConfigBase):
    """UltraEdit's hyper-parameters: ridge 1, 100 edits per chunk and forward batches of 10 as the reference
    code; lr = 1e-4 measured on SmolLM2 with the default layers (20 CounterFact edits: 1e-5 barely moves the
    targets, 1e-3 breaks the model, KL 2.9 nats/token; the reference uses 1e-6 on Llama-3-8B)."""

    lr: float = option(1e-4, "step size of the normalised pseudo-gradient values", low=0.0, low_open=True)
    ridge: float = option(1.0, "ρ, the ridge added to KᵀK", low=0.0, low_open=True)
    chunk_size: int | None = option(100, "edits per lifelong step, each solved on the model edited so far "
                                         "(none = all at once)", low=1)
    batch_size: int = option(10, "requests per forward/backward pass", low=1)


@dataclass(frozen=True)
class MendConfig(ConfigBase):
    """Editing with a trained MEND hypernetwork (train one with `python -m crispedit.baselines.mend_train`)."""

    hypernet: str | None = option(None, "folder of a trained MEND hypernetwork (hypernet.safetensors + "
                                        "hypernet.json)", metavar="DIR")
    chunk_size: int | None = option(None, "sequential variant: edit this many requests at a time on the model "
                                          "edited so far (none = all at once)", low=1)
    batch_size: int = option(16, "requests per forward/backward pass", low=1)


CONFIGS: dict[str, type[ConfigBase]] = {"alphaedit": AlphaEditConfig, "memit": MemitConfig, "mend": MendConfig,
                                        "ultraedit": UltraEditConfig}
METHODS = tuple(sorted(CONFIGS))
NEEDS_CACHE = frozenset({"memit", "alphaedit"})  # key covariance = the cache's A
KEY_VALUE = frozenset({"memit", "alphaedit"})  # subject keys, down-projection targets
