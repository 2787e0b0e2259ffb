"""The exact Gauss-Newton and Hessian of the study's head, as matrix-free products and as a dense block.

The head is fc2 → ReLU → fc3 on frozen features x; the fine-tuned parameters are θ = (vec W2, vec W3)
(row-major, biases frozen) and the loss is the mean softmax cross-entropy. Per example n, with
z = W2 x + b2, m = 1[z > 0], a = m ⊙ z, logits ℓ = W3 a + b3, p = softmax(ℓ), H_n = diag(p) − ppᵀ and
g_n = p − e_y (the gradient of the loss with respect to the logits):

    GGN    G = (1/N) Σ_n J_nᵀ H_n J_n,     J_n v = W3 (m ⊙ (V2 x)) + V3 a
    Hessian H = G + R,   R's only non-zero block couples W3[c, i] and W2[i, j]:  (1/N) Σ_n g_nc m_ni x_nj

(ReLU'' = 0 almost everywhere and the logits are linear in W3, so the residual term has no W2–W2 or
W3–W3 block). Two consequences used by the study:

- **Live coordinates.** A feature j that is zero on every curvature example, or a hidden unit i that is
  inactive on every example, makes the rows and columns of W2[:, j], W2[i, :] and W3[:, i] exactly zero
  in both G and H. Those directions have zero curvature, are never removed by a γ < 1 cutoff and need no
  eigendecomposition; everything below works on the live block only (5,664 of 10,920 weights for the
  84-unit head at θ0).
- **Exact trace.** diag(R) = 0, so diag(H) = diag(G), and diag(G) has a closed form (`diagonal`): the
  trace — the denominator of the γ-energy rule — is exact without forming either matrix.

Products cost O(N · d) per vector with a few GEMMs (several times faster than curvlinops' generic
operators, which the tests use as the oracle), and the dense live block is formed from Kronecker sums
(Σ_n M_n ⊗ x_n x_nᵀ) in O(N · d_live²) — about 20× faster than applying an operator to identity columns.
"""

from __future__ import annotations

import torch

from crispedit.study.lenet import Head

KINDS = ("ggn", "hessian")


class HeadCurvature:
    """Exact GGN or Hessian (kind) of the mean cross-entropy over (x, y) at the head's current weights,
    restricted to the live coordinates, in float64."""

    def __init__(self, kind: str, head: Head, x: torch.Tensor, y: torch.Tensor):
        if kind not in KINDS:
            raise ValueError(f"unknown exact curvature {kind!r}; expected one of {KINDS}")
        if x.ndim != 2 or y.shape != (x.shape[0],) or x.shape[0] == 0:
            raise ValueError(f"expected features (N, d_in) and labels (N,), got {tuple(x.shape)} and {tuple(y.shape)}")
        self.kind = kind
        with torch.no_grad():
            W2 = head.fc2.weight.detach().double()
            b2 = head.fc2.bias.detach().double()
            W3 = head.fc3.weight.detach().double()
            b3 = head.fc3.bias.detach().double()
            x = x.detach().double()
            self.full_shapes = [W2.shape, W3.shape]
            self.live_f = (x != 0).any(0)
            self.live_h = ((x @ W2.T + b2) > 0).any(0)
            self.x = x[:, self.live_f].contiguous()
            self.W3 = W3[:, self.live_h].contiguous()
            z = self.x @ W2[self.live_h][:, self.live_f].T + b2[self.live_h]
            self.m = (z > 0).double()
            self.a = z * self.m
            logits = self.a @ self.W3.T + b3
            self.p = torch.softmax(logits, dim=-1)
            self.g = self.p.clone()
            self.g[torch.arange(len(y)), y] -= 1.0
        self.N, self.f = self.x.shape
        self.h = self.W3.shape[1]
        self.C = self.W3.shape[0]

    # ------------------------------------------------------------------------------------------ layout

    @property
    def d(self) -> int:
        """Number of tuned weights (all coordinates)."""
        return sum(int(s.numel()) for s in self.full_shapes)

    @property
    def d_live(self) -> int:
        return self.h * self.f + self.C * self.h

    def live_mask(self) -> torch.Tensor:
        """Bool (d,) over the flattened (vec W2, vec W3): True on the live coordinates, in the order of the
        live block's rows."""
        m2 = self.live_h[:, None] & self.live_f[None, :]
        m3 = torch.ones(self.C, dtype=torch.bool)[:, None] & self.live_h[None, :]
        return torch.cat([m2.reshape(-1), m3.reshape(-1)])

    # ------------------------------------------------------------------------------------------ products

    def diagonal(self) -> torch.Tensor:
        """Exact diagonal of the live block (the same for the GGN and the Hessian)."""
        q = self.p @ self.W3 ** 2 - (self.p @ self.W3) ** 2  # (N, h): (W3ᵀ H_n W3)_ii
        d2 = (self.m * q).T @ self.x ** 2 / self.N  # (h, f)
        d3 = (self.p - self.p ** 2).T @ self.a ** 2 / self.N  # (C, h)
        return torch.cat([d2.reshape(-1), d3.reshape(-1)])

    def trace(self) -> float:
        return float(self.diagonal().sum())

    def matmat(self, V: torch.Tensor) -> torch.Tensor:
        """M V for V (d_live, b) (or (d_live,)) with M the live block of the GGN or Hessian."""
        vec = V.ndim == 1
        V = V.reshape(self.d_live, -1).double()
        N, f, h, C, b = self.N, self.f, self.h, self.C, V.shape[1]
        V2 = V[: h * f].T.reshape(b * h, f)
        V3 = V[h * f:].T.reshape(b, C, h)
        dz = (self.x @ V2.T).reshape(N, b, h)
        da = self.m[:, None, :] * dz
        dl = (da.reshape(N * b, h) @ self.W3.T).reshape(N, b, C)
        dl = dl + (self.a @ V3.permute(2, 0, 1).reshape(h, b * C)).reshape(N, b, C)
        p = self.p[:, None, :]
        u = p * dl - p * (p * dl).sum(-1, keepdim=True)  # H_n J_n v
        o3 = (u.reshape(N, b * C).T @ self.a).reshape(b, C * h)
        q = self.m[:, None, :] * (u.reshape(N * b, C) @ self.W3).reshape(N, b, h)
        if self.kind == "hessian":  # the residual R couples W3 with W2
            o3 = o3 + (self.g.T @ da.reshape(N, b * h)).reshape(C, b, h).permute(1, 0, 2).reshape(b, C * h)
            gv = (self.g @ V3.permute(1, 0, 2).reshape(C, b * h)).reshape(N, b, h)  # (V3ᵀ g_n)_i
            q = q + self.m[:, None, :] * gv
        o2 = (q.reshape(N, b * h).T @ self.x).reshape(b, h * f)
        out = torch.cat([o2, o3], 1).T / N
        return out.reshape(-1) if vec else out

    def dense(self) -> torch.Tensor:
        """The live block (d_live × d_live, float64) from Kronecker sums over the examples."""
        N, f, h, C = self.N, self.f, self.h, self.C
        x, a, m, W3, p = self.x, self.a, self.m, self.W3, self.p
        Hn = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]  # (N, C, C)
        WH = torch.einsum("ch,ncd->nhd", W3, Hn) * m[:, :, None]  # (N, h, C): (m ⊙ W3ᵀ) H_n
        M = torch.einsum("nhd,de->nhe", WH, W3) * m[:, None, :]  # (N, h, h)
        G22 = (M.reshape(N, h * h).T @ (x[:, :, None] * x[:, None, :]).reshape(N, f * f))
        G22 = G22.reshape(h, h, f, f).permute(0, 2, 1, 3).reshape(h * f, h * f)
        G33 = (Hn.reshape(N, C * C).T @ (a[:, :, None] * a[:, None, :]).reshape(N, h * h))
        G33 = G33.reshape(C, C, h, h).permute(0, 2, 1, 3).reshape(C * h, C * h)
        G23 = (WH.reshape(N, h * C).T @ (x[:, :, None] * a[:, None, :]).reshape(N, f * h))
        G23 = G23.reshape(h, C, f, h).permute(0, 2, 1, 3)  # (i, j, c, i')
        if self.kind == "hessian":
            T = torch.einsum("nc,ni,nj->ijc", self.g, m, x)  # (h, f, C)
            idx = torch.arange(h)
            G23[idx, :, :, idx] += T
        G23 = G23.reshape(h * f, C * h)
        out = torch.empty(self.d_live, self.d_live, dtype=torch.float64)
        out[: h * f, : h * f] = G22
        out[h * f:, h * f:] = G33
        out[: h * f, h * f:] = G23
        out[h * f:, : h * f] = G23.T
        out /= N
        return 0.5 * (out + out.T)
