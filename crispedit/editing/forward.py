"""The edit loss of a batch, computed with only the work the loss needs.

Three savings, exact by construction and checked against the plain forward when the object is built:

1. **Frozen prefix.** Every weight below the first edited decoder layer is frozen, so the hidden states entering
   that layer are fixed for each training sequence. They are computed once (no grad) and cached; each step then
   runs only the layers from the first target up: the decoder layers below it are swapped for a no-op for the
   duration of the call, and a pre-hook hands the first kept layer the cached states. Everything the model
   computes outside its layers (position ids, rotary tables, causal masks) is computed as usual, so the kept
   layers see exactly what they see in a full forward. The cache is rebuilt if a parameter below the first
   target changes (parameters' in-place version counters and storages are checked at every call).
2. **Logits only where the loss is.** The LM head (d_model × vocab, a fifth of a small model's forward) and the
   softmax run only at the positions whose next token is scored (the target tokens), not at every position.
3. **Frozen positions.** When the change of the targets acts only at given positions (`active`, e.g. the subject's
   last token), every position before the first active one (and before the first scored one) computes exactly what
   the base model computes, at every layer (attention is causal, and the targets output their base weights' output
   there). Their keys and values at the kept layers are computed once with the base weights and handed to the
   attention as a cache; each step runs the kept layers on the remaining positions only (about a third of the
   tokens of the default training sequences). Rebuilt, like the prefix, if any parameter but the targets changes.

The model is driven through its public pieces (`model.base_model`, `model.get_output_embeddings()`, the
`ModuleList` that holds the targets), so the same code serves Llama, Qwen2, Mistral and GPT-2 style models. A model
that post-processes its logits (soft-capping, scaling) or whose layers depend on each other beyond the hidden
states fails the check at construction and falls back to the plain forward with a warning — never a wrong loss.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
from torch import nn
from transformers import DynamicCache

from crispedit.formatting import EncodedPair, collate
from crispedit.models.targets import as_weight_matrix

log = logging.getLogger(__name__)

# Tolerance of the construction-time check (per-token NLL, fast path vs plain forward), by dtype.
CHECK_TOL = {torch.float64: 1e-9, torch.float32: 2e-3, torch.bfloat16: 8e-2, torch.float16: 8e-2}


class _Stop(Exception):
    """Raised by the capture hook to end a prefix forward once the first kept layer's input is known."""


@dataclass(frozen=True)
class LayerStack:
    """Where the targets live: the decoder layers' `ModuleList` (by path) and the lowest layer holding a target."""

    path: str
    first: int


def find_layer_stack(model: nn.Module, targets: Sequence[str]) -> LayerStack | None:
    """The decoder-layer list that contains every target, and the lowest target layer; None if some target is
    outside the layer list (embeddings, LM head) or the targets are spread over several lists."""
    stacks = set()
    firsts = []
    for name in targets:
        parts = name.split(".")
        found = None
        for i in range(1, len(parts) - 1):
            parent = model.get_submodule(".".join(parts[:i]))
            if isinstance(parent, nn.ModuleList) and parts[i].isdigit():
                found = (".".join(parts[:i]), int(parts[i]))
                break
        if found is None:
            return None
        stacks.add(found[0])
        firsts.append(found[1])
    if len(stacks) != 1:
        return None
    path = stacks.pop()
    base = getattr(model, "base_model", model)
    owned = {id(m) for m in base.modules()}
    if id(model.get_submodule(path)) not in owned:
        return None
    return LayerStack(path, min(firsts))


class _Skip(nn.Module):
    """Stands in for a frozen decoder layer below the first target: returns its input (shaped like the real
    layer's output: a tensor, or a tuple whose first item is the hidden states)."""

    def __init__(self, tuple_len: int | None):
        super().__init__()
        self.tuple_len = tuple_len

    def forward(self, hidden_states=None, *args, **kwargs):
        h = hidden_states if hidden_states is not None else args[0]
        if self.tuple_len is None:
            return h
        return (h,) + (None,) * (self.tuple_len - 1)


def _hidden_arg(args: tuple, kwargs: dict) -> torch.Tensor:
    return kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]


def _cache_keyword(base: nn.Module) -> str | None:
    """The name under which the decoder takes a key/value cache (`cache` in recent transformers), or None."""
    import inspect

    try:
        params = inspect.signature(base.forward).parameters
    except (TypeError, ValueError):
        return None
    return next((k for k in ("cache", "past_key_values") if k in params), None)


def _with_hidden(args: tuple, kwargs: dict, h: torch.Tensor) -> tuple[tuple, dict]:
    if "hidden_states" in kwargs:
        return args, dict(kwargs, hidden_states=h)
    return (h,) + tuple(args[1:]), kwargs


class EditForward:
    """Token-level edit loss of batches of encoded (prompt, target) pairs, with the frozen prefix cached and the
    LM head applied at the scored positions only.

    Args:
        model: a causal LM; its parameters below the first target must stay frozen between calls (they are
            watched, and the cache is rebuilt if one changes).
        targets: the edited modules' paths.
        pairs: the training sequences, indexed by the ids passed to `token_nll`.
        pad_id: padding token id (padding is masked, so any id is sound).
        cache_prefix / logits_at_targets: switch each saving off (the plain forward is used for what is off).
        check: compare with the plain forward on a few sequences when built (falls back on a mismatch).
        active: per sequence, the positions where the targets' change from `base_weights` acts in `token_nll`
            (None for a sequence, or for all: every position). Elsewhere a target outputs what its base weights
            would, so the loss's gradient comes from the active positions only; `last_logits` always uses the
            whole change (it measures the edited model as it will run).
        base_weights: the targets' weights before the edit ([out, in] matrices), needed with `active`.
        cache_kv: with `active` (and the prefix cached), run the kept layers only from each sequence's first active
            or scored position, the keys/values before it cached (saving 3 above).
    """

    def __init__(self, model: nn.Module, targets: Sequence[str], pairs: Sequence[EncodedPair], pad_id: int,
                 cache_prefix: bool = True, logits_at_targets: bool = True, check: bool = True,
                 prefix_batch_size: int = 32, active: Sequence[Sequence[int] | None] | None = None,
                 base_weights: dict[str, torch.Tensor] | None = None, cache_kv: bool = True):
        self.model = model
        self.pairs = list(pairs)
        if active is not None and (len(active) != len(self.pairs) or base_weights is None):
            raise ValueError("`active` needs one entry per sequence and the targets' base weights")
        self.active = None if active is None or all(a is None for a in active) else list(active)
        self.base_weights = dict(base_weights or {})
        self.targets = list(targets)
        self.pad_id = int(pad_id)
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.prefix_batch_size = prefix_batch_size
        self.stack = find_layer_stack(model, targets) if cache_prefix else None
        if self.stack is not None and self.stack.first == 0:
            self.stack = None  # nothing below the first target: no prefix to cache
        self.logits_at_targets = logits_at_targets
        self.head = model.get_output_embeddings() if logits_at_targets else None
        if logits_at_targets and self.head is None:
            self.logits_at_targets = False
        self._prefix: list[torch.Tensor] | None = None
        self._tuple_len: int | None = None
        self._watch: list[tuple[torch.Tensor, int, int]] = []
        self._start = self._frozen_lengths() if cache_kv and self.stack is not None and self.active is not None \
            else None
        self._kv: list[torch.Tensor | None] | None = None
        self._cache_kw = _cache_keyword(getattr(model, "base_model", model))
        if self._cache_kw is None:
            self._start = None
        if check and self.uses_shortcuts:
            self._check()

    @property
    def uses_shortcuts(self) -> bool:
        return self.stack is not None or self.logits_at_targets

    @property
    def caches_kv(self) -> bool:
        return self._start is not None

    def run_lengths(self) -> list[int]:
        """Per sequence, the positions `token_nll` runs through the kept layers (what a batch's cost scales with)."""
        start = self._start or [0] * len(self.pairs)
        return [len(p.input_ids) - s for p, s in zip(self.pairs, start)]

    def describe(self) -> dict:
        out = {"prefix_cached_below_layer": None if self.stack is None else self.stack.first,
               "layer_stack": None if self.stack is None else self.stack.path,
               "logits_at_targets_only": self.logits_at_targets,
               "frozen_positions_cached": self.caches_kv}
        if self._start is not None:
            total = sum(len(p.input_ids) for p in self.pairs)
            out["frozen_position_fraction"] = round(sum(self._start) / max(total, 1), 4)
        return out

    # ------------------------------------------------------------------ public
    def token_nll(self, idx: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token NLL of the scored (target) tokens of the sequences `idx`, flat [N], and the batch row of
        each token [N] (row r is sequence idx[r])."""
        pairs = [self.pairs[i] for i in idx]
        start = [0] * len(idx) if self._start is None else [self._start[i] for i in idx]
        batch = {k: v.to(self.device) for k, v in
                 collate([p.input_ids[s:] for p, s in zip(pairs, start)], self.pad_id,
                         labels=[p.labels[s:] for p, s in zip(pairs, start)]).items()}
        labels = batch["labels"]
        sel = labels[:, 1:] != -100  # position t is scored when token t+1 is a target token
        tgt = labels[:, 1:][sel]
        rows = sel.nonzero()[:, 0]
        length = labels.shape[1]
        # run from the frozen positions on (their keys/values as a cache), or over whole sequences
        inputs = self._past(idx, start, batch["attention_mask"]) if any(start) else \
            {"attention_mask": batch["attention_mask"]}
        with self._prefix_hidden(idx, length, start), self._active_only(self._active_mask(idx, length, start)):
            if self.logits_at_targets:
                base = getattr(self.model, "base_model", self.model)
                hidden = base(input_ids=batch["input_ids"], use_cache=False, **inputs).last_hidden_state
                logits = self.head(hidden[:, :-1][sel])  # [N, vocab]
            else:
                logits = self.model(input_ids=batch["input_ids"], use_cache=False, **inputs).logits[:, :-1][sel]
        nll = nn.functional.cross_entropy(logits.float(), tgt, reduction="none")
        return nll, rows

    def last_logits(self, idx: Sequence[int]) -> torch.Tensor:
        """Next-token logits after the last token of each sequence `idx` (a prompt whose answer is to come),
        [B, vocab] in float32; same shortcuts as `token_nll`."""
        pairs = [self.pairs[i] for i in idx]
        batch = {k: v.to(self.device) for k, v in collate([p.input_ids for p in pairs], self.pad_id).items()}
        last = torch.tensor([len(p.input_ids) - 1 for p in pairs], device=self.device)
        rows = torch.arange(len(pairs), device=self.device)
        with self._prefix_hidden(idx, batch["input_ids"].shape[1]):
            if self.logits_at_targets:
                base = getattr(self.model, "base_model", self.model)
                hidden = base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                              use_cache=False).last_hidden_state
                logits = self.head(hidden[rows, last])
            else:
                logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                    use_cache=False).logits[rows, last]
        return logits.float()

    # ------------------------------------------------------------------ where the change acts
    def _active_mask(self, idx: Sequence[int], length: int, start: Sequence[int]) -> torch.Tensor | None:
        """[B, length] True where the change acts, for the sequences `idx` run from positions `start`."""
        if self.active is None:
            return None
        mask = torch.ones(len(idx), length, dtype=torch.bool, device=self.device)
        for r, i in enumerate(idx):
            if self.active[i] is not None:
                mask[r] = False
                mask[r, [a - start[r] for a in self.active[i] if 0 <= a - start[r] < length]] = True
        return mask

    @contextlib.contextmanager
    def _active_only(self, mask: torch.Tensor | None) -> Iterator[None]:
        """Within the block, each target's output where `mask` is False is its base weights' output."""
        if mask is None:
            yield
            return

        def hook(name):
            def keep_base(module, args, out):
                change = as_weight_matrix(module, module.weight) - self.base_weights[name].to(out.dtype)
                return torch.where(mask[..., None], out, out - nn.functional.linear(args[0], change))
            return keep_base

        handles = [self.model.get_submodule(n).register_forward_hook(hook(n)) for n in self.targets]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    # ------------------------------------------------------------------ frozen prefix
    def _layers(self) -> nn.ModuleList:
        return self.model.get_submodule(self.stack.path)

    def _watched(self) -> list[tuple[torch.Tensor, int, int]]:
        if self._start is not None:  # the cached keys/values depend on every weight of the kept layers but the targets'
            kept = {id(self.model.get_submodule(n).weight) for n in self.targets}
        else:
            kept = {id(p) for layer in list(self._layers())[self.stack.first:] for p in layer.parameters()}
        head = self.model.get_output_embeddings()
        head_params = {id(p) for p in head.parameters()} if head is not None else set()
        inp = self.model.get_input_embeddings()
        inp_params = {id(p) for p in inp.parameters()} if inp is not None else set()
        out = []
        for p in self.model.parameters():
            # the head's own weight only matters below when it is tied to the input embedding
            if id(p) in kept or (id(p) in head_params and id(p) not in inp_params):
                continue
            out.append((p, p._version, p.data_ptr()))
        return out

    def _stale(self) -> bool:
        return any(p._version != v or p.data_ptr() != ptr for p, v, ptr in self._watch)

    def _build_prefix(self) -> None:
        """Hidden states entering the first target layer, per sequence (no grad, model dtype, model device)."""
        layers = self._layers()
        first = layers[self.stack.first]
        captured: dict[str, torch.Tensor] = {}

        def capture(_module, args, kwargs):
            captured["h"] = _hidden_arg(args, kwargs)
            raise _Stop

        def shape(_module, _args, output):
            self._tuple_len = len(output) if isinstance(output, tuple) else None

        base = getattr(self.model, "base_model", self.model)
        order = sorted(range(len(self.pairs)), key=lambda i: len(self.pairs[i].input_ids))
        prefix: list[torch.Tensor | None] = [None] * len(self.pairs)
        h1 = first.register_forward_pre_hook(capture, with_kwargs=True)
        h0 = layers[0].register_forward_hook(shape)
        try:
            with torch.no_grad():
                for s in range(0, len(order), self.prefix_batch_size):
                    idx = order[s:s + self.prefix_batch_size]
                    b = collate([self.pairs[i].input_ids for i in idx], self.pad_id)
                    try:
                        base(input_ids=b["input_ids"].to(self.device),
                             attention_mask=b["attention_mask"].to(self.device), use_cache=False)
                    except _Stop:
                        pass
                    for r, i in enumerate(idx):
                        prefix[i] = captured["h"][r, :len(self.pairs[i].input_ids)].detach().clone()
        finally:
            h1.remove()
            h0.remove()
        self._prefix = prefix  # type: ignore[assignment]
        if self._start is not None:
            self._build_kv()
        self._watch = self._watched()

    def _frozen_lengths(self) -> list[int] | None:
        """Per sequence, how many leading positions compute what the base model computes at every layer: those
        before the first active position and before the first scored one (None if no sequence has any)."""
        out = []
        for p, act in zip(self.pairs, self.active):
            out.append(0 if act is None or not p.target_ids else max(0, min(min(act), len(p.prompt_ids) - 1)))
        return out if any(out) else None

    def _build_kv(self) -> None:
        """Keys and values of each sequence's frozen positions at the kept layers, with the targets at their base
        weights: [kept layers, 2, kv heads, frozen length, head dim] per sequence (None where it has none)."""
        base = getattr(self.model, "base_model", self.model)
        first, n_layers = self.stack.first, len(self._layers())
        order = sorted((i for i, s in enumerate(self._start) if s), key=lambda i: self._start[i])
        kv: list[torch.Tensor | None] = [None] * len(self.pairs)
        with torch.no_grad():
            for b in range(0, len(order), self.prefix_batch_size):
                idx = order[b:b + self.prefix_batch_size]
                batch = collate([self.pairs[i].input_ids[:self._start[i]] for i in idx], self.pad_id)
                length = batch["input_ids"].shape[1]
                cache = DynamicCache()
                nowhere = torch.zeros(len(idx), length, dtype=torch.bool, device=self.device)
                with self._active_only(nowhere):
                    base(input_ids=batch["input_ids"].to(self.device),
                         attention_mask=batch["attention_mask"].to(self.device), use_cache=True,
                         **{self._cache_kw: cache})
                for r, i in enumerate(idx):
                    s = self._start[i]
                    kv[i] = torch.stack([torch.stack([cache.layers[j].keys[r, :, :s], cache.layers[j].values[r, :, :s]])
                                         for j in range(first, n_layers)]).clone()
        self._kv = kv

    def _past(self, idx: Sequence[int], start: Sequence[int], mask: torch.Tensor) -> dict:
        """The model's keyword arguments to run the sequences `idx` from positions `start`: the frozen positions'
        keys/values as a cache (left-padded to a common length), the attention mask over cache + new tokens and the
        new tokens' position ids."""
        if self._prefix is None or self._stale():
            self._build_prefix()
        first = self.stack.first
        some = next(self._kv[i] for i, s in zip(idx, start) if s)
        n_kept, _, heads, _, dim = some.shape
        width = max(start)
        buf = torch.zeros(n_kept, 2, len(idx), heads, width, dim, dtype=some.dtype, device=some.device)
        seen = torch.zeros(len(idx), width, dtype=mask.dtype, device=self.device)
        for r, (i, s) in enumerate(zip(idx, start)):
            if s:
                buf[:, :, r, :, width - s:] = self._kv[i]
                seen[r, width - s:] = 1
        layers = [(buf[0, 0], buf[0, 1])] * first + [(buf[j, 0], buf[j, 1]) for j in range(n_kept)]
        pos = torch.tensor(start, device=self.device)[:, None] + torch.arange(mask.shape[1], device=self.device)
        return {self._cache_kw: DynamicCache(ddp_cache_data=layers), "attention_mask": torch.cat([seen, mask], 1),
                "position_ids": pos}

    @contextlib.contextmanager
    def _prefix_hidden(self, idx: Sequence[int], length: int, start: Sequence[int] | None = None) -> Iterator[None]:
        """Run the model with the layers below the first target skipped and their output taken from the cache
        (each sequence from its position `start`)."""
        if self.stack is None:
            yield
            return
        if self._prefix is None or self._stale():
            if self._prefix is not None:
                log.info("a parameter below the first edited layer changed: recomputing the cached prefix")
            self._build_prefix()
        cached = self._prefix
        h = torch.zeros(len(idx), length, cached[0].shape[-1], dtype=cached[0].dtype, device=self.device)
        for r, i in enumerate(idx):
            s = start[r] if start else 0
            h[r, :cached[i].shape[0] - s] = cached[i][s:]

        def feed(_module, args, kwargs):
            return _with_hidden(args, kwargs, h)

        layers = self._layers()
        skipped = [layers[i] for i in range(self.stack.first)]
        skip = _Skip(self._tuple_len)
        handle = layers[self.stack.first].register_forward_pre_hook(feed, with_kwargs=True)
        try:
            for i in range(self.stack.first):
                layers[i] = skip
            yield
        finally:
            for i, layer in enumerate(skipped):
                layers[i] = layer
            handle.remove()

    # ------------------------------------------------------------------ construction check
    def _plain_nll(self, idx: Sequence[int]) -> torch.Tensor:
        pairs = [self.pairs[i] for i in idx]
        b = {k: v.to(self.device) for k, v in
             collate([p.input_ids for p in pairs], self.pad_id, labels=[p.labels for p in pairs]).items()}
        logits = self.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False).logits
        sel = b["labels"][:, 1:] != -100
        return nn.functional.cross_entropy(logits[:, :-1][sel].float(), b["labels"][:, 1:][sel], reduction="none")

    def _check(self) -> None:
        """Compare the shortcuts with the plain forward on a few sequences (those with frozen positions first);
        on a mismatch drop the frozen-position cache alone if that fixes it, else every shortcut."""
        order = sorted(range(len(self.pairs)), key=lambda i: -(self._start[i] if self._start else 0))
        idx = [i for i in order if self.pairs[i].target_ids][:4]
        if not idx:
            return
        why = self._mismatch(idx)
        if why and self._start is not None:
            self._start, self._kv = None, None
            self._prefix = None
            if not self._mismatch(idx):
                warnings.warn(f"the cached keys/values of the frozen positions do not reproduce this model's loss "
                              f"({why}); running every position", RuntimeWarning, stacklevel=3)
                return
        if why:
            warnings.warn(f"the cached-prefix / target-logits forward does not reproduce this model's loss ({why}); "
                          "using the plain forward", RuntimeWarning, stacklevel=3)
            self.stack = None
            self.logits_at_targets = False
            self._prefix = None
            self._start, self._kv = None, None

    def _mismatch(self, idx: Sequence[int]) -> str:
        """Why the shortcut loss of `idx` differs from the plain forward's ('' when it does not)."""
        try:
            with torch.no_grad():
                fast, _ = self.token_nll(idx)
                plain = self._plain_nll(idx)
            tol = CHECK_TOL.get(self.dtype, 1e-3)
            if fast.shape == plain.shape and torch.allclose(fast, plain, rtol=tol, atol=tol):
                return ""
            return f"max |Δ NLL| {float((fast - plain).abs().max()):.3g}" if fast.shape == plain.shape else "shapes"
        except Exception as e:  # an architecture the shortcuts do not fit
            return f"{type(e).__name__}: {e}"


def per_sequence_mean(nll: torch.Tensor, rows: torch.Tensor, n_rows: int) -> torch.Tensor:
    """Mean token NLL per batch row from the flat per-token NLL and each token's row."""
    sums = torch.zeros(n_rows, dtype=nll.dtype, device=nll.device).index_add_(0, rows, nll)
    counts = torch.zeros(n_rows, dtype=nll.dtype, device=nll.device).index_add_(0, rows, torch.ones_like(nll))
    return sums / counts.clamp_min(1)
