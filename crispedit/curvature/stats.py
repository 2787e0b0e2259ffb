"""K-FAC statistics kept as float64 sums plus token counts.

Sums (not means) are the unit of exchange so that shards, processes, extra corpus and the edits of
sequential editing all combine by addition; a factor is normalised only when it is used.

Scaling convention (kept everywhere): the capability loss is the *mean* next-token cross-entropy over
valid token positions, L = (1/N) Σ_t ℓ_t. Its Gauss-Newton block for a linear layer is approximated
(K-FAC "expand", weight sharing over positions) by A ⊗ S with
    A = (1/N) Σ_t a_t a_tᵀ          (layer inputs at valid positions)
    S = (1/N) Σ_t ĝ_t ĝ_tᵀ          (ĝ_t = ∂(Σ_t' ℓ_t')/∂s_t, gradient of the per-sequence *sum* loss
                                      with respect to the layer output at position t)
which is the convention of curvlinops' KFACLinearOperator with a mean-reduced loss.
In row-major vec(W) for W of shape (d_out, d_in) the block is S ⊗ A.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class LayerStats:
    """Running sums for one target layer. `A_sink`/`n_sink` hold the leading ("attention sink")
    positions when they are kept apart from A (see `CurvatureConfig.sink_tokens`)."""

    A: torch.Tensor
    S: torch.Tensor
    n: int = 0
    A_sink: torch.Tensor | None = None
    n_sink: int = 0

    @classmethod
    def zeros(cls, d_in: int, d_out: int, sink: bool = False, device: torch.device | str = "cpu") -> "LayerStats":
        z = lambda d: torch.zeros(d, d, dtype=torch.float64, device=device)  # noqa: E731
        return cls(A=z(d_in), S=z(d_out), n=0, A_sink=z(d_in) if sink else None, n_sink=0)

    @property
    def d_in(self) -> int:
        return self.A.shape[0]

    @property
    def d_out(self) -> int:
        return self.S.shape[0]

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised (A, S) = sums / token count."""
        if self.n == 0:
            raise ValueError("no tokens were accumulated")
        return self.A / self.n, self.S / self.n

    def full_input_factor(self) -> torch.Tensor:
        """A over all valid positions, sink positions included (the curvature the model actually has)."""
        if self.A_sink is None or self.n_sink == 0:
            return self.factors()[0]
        return (self.A + self.A_sink) / (self.n + self.n_sink)

    def sink_factor(self) -> torch.Tensor | None:
        if self.A_sink is None or self.n_sink == 0:
            return None
        return self.A_sink / self.n_sink

    def add_(self, other: "LayerStats") -> "LayerStats":
        if (self.d_in, self.d_out) != (other.d_in, other.d_out):
            raise ValueError(f"shape mismatch: ({self.d_out},{self.d_in}) vs ({other.d_out},{other.d_in})")
        self.A += other.A.to(self.A.device)
        self.S += other.S.to(self.S.device)
        self.n += other.n
        if (self.A_sink is None) != (other.A_sink is None):
            raise ValueError("cannot merge statistics collected with and without separate sink positions")
        if self.A_sink is not None:
            self.A_sink += other.A_sink.to(self.A_sink.device)
            self.n_sink += other.n_sink
        return self

    def scaled_(self, k: int) -> "LayerStats":
        """Count every accumulated token k times (the statistics of k copies of the same data)."""
        if int(k) != k or k < 1:
            raise ValueError(f"a statistics weight must be a positive integer, got {k}")
        k = int(k)
        self.A *= k
        self.S *= k
        self.n *= k
        if self.A_sink is not None:
            self.A_sink *= k
            self.n_sink *= k
        return self

    def clone(self) -> "LayerStats":
        return LayerStats(self.A.clone(), self.S.clone(), self.n,
                          None if self.A_sink is None else self.A_sink.clone(), self.n_sink)


@dataclass
class KFACStats:
    """Statistics for every target layer, keyed by module path (model order)."""

    layers: dict[str, LayerStats] = field(default_factory=dict)

    def __getitem__(self, name: str) -> LayerStats:
        return self.layers[name]

    def __iter__(self):
        return iter(self.layers)

    def items(self):
        return self.layers.items()

    @property
    def n_tokens(self) -> int:
        return max((s.n for s in self.layers.values()), default=0)

    def add_(self, other: "KFACStats") -> "KFACStats":
        if list(self.layers) != list(other.layers):
            raise ValueError(f"target layers differ: {list(self.layers)} vs {list(other.layers)}")
        for k in self.layers:
            self.layers[k].add_(other.layers[k])
        return self

    def scaled_(self, k: int) -> "KFACStats":
        for v in self.layers.values():
            v.scaled_(k)
        return self

    def clone(self) -> "KFACStats":
        return KFACStats({k: v.clone() for k, v in self.layers.items()})
