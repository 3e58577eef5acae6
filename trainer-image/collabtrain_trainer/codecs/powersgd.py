"""PowerSGD (Vogels et al., 2019): a rank-r approximation found by one power iteration.

The flat gradient is viewed as a near-square matrix M (rows x cols). With a query Q
(cols x r) shared by all members, every member's P_i = M_i Q sums to (sum M_i) Q, so the
factors travel through all_reduce: sum P, orthonormalize it to P^, sum Q_i = M_i^T P^, and
P^ (sum Q_i)^T approximates sum M_i. Q is warm-started from the previous round, which
makes one iteration per round enough; a cold start uses the same seeded Q everywhere.
This does not fit the part codecs' encode/decode of independent pieces, hence its own API.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from collabtrain_trainer.config import CompressionConfig


def matrix_shape(numel: int) -> tuple[int, int]:
    """(rows, cols) with rows = ceil(sqrt(numel)), the squarest shape that holds numel."""
    rows = math.isqrt(numel)
    if rows * rows < numel:
        rows += 1
    return rows, math.ceil(numel / rows) if rows else 0


def orthonormalize(p: Tensor) -> Tensor:
    """Orthonormal columns spanning p's; Householder QR stays finite on rank-deficient p."""
    q: Tensor = torch.linalg.qr(p, mode="reduced").Q
    return q


@dataclass
class PowerSGDRound:
    """One round's local values between the all_reduce of P and the all_reduce of Q."""

    numel: int
    matrix: Tensor  # this member's contribution plus residual, rows x cols
    query: Tensor  # the shared Q this round started from, cols x r
    p_hat: Tensor | None = None
    local_q: Tensor | None = None

    def local_p(self) -> Tensor:
        """This member's P_i = M_i Q, to be summed over members."""
        return self.matrix @ self.query

    def local_q_from(self, p_sum: Tensor) -> Tensor:
        """This member's Q_i = M_i^T P^ given the summed P, to be summed over members."""
        self.p_hat = orthonormalize(p_sum)
        self.local_q = self.matrix.T @ self.p_hat
        return self.local_q

    def decompress(self, q_sum: Tensor) -> Tensor:
        """The flat approximation P^ (sum Q_i)^T of the members' summed contributions."""
        if self.p_hat is None:
            raise RuntimeError("local_q_from must run before decompress")
        return (self.p_hat @ q_sum.T).reshape(-1)[: self.numel]

    def residual(self) -> Tensor:
        """What this member's own contribution lost: M_i - P^ P^T M_i, flat."""
        if self.p_hat is None or self.local_q is None:
            raise RuntimeError("local_q_from must run before residual")
        return (self.matrix - self.p_hat @ self.local_q.T).reshape(-1)[: self.numel]


class PowerSGD:
    """Per-member PowerSGD state: the warm-start query and the error-feedback residual.

    The residual is this member's own projection error (not the gap to the group's
    average), so it stays meaningful when the membership changes; the warm query does not,
    because every member must start a round from the same Q.
    """

    def __init__(self, rank: int, seed: int = 0, error_feedback: bool = True) -> None:
        if rank < 1:
            raise ValueError(f"PowerSGD rank must be at least 1, got {rank}")
        self.rank = rank
        self.seed = seed
        self.error_feedback = error_feedback
        self.warm_query: Tensor | None = None
        self.residual: Tensor | None = None

    @classmethod
    def from_config(cls, config: CompressionConfig, seed: int = 0) -> PowerSGD:
        return cls(rank=config.rank, seed=seed, error_feedback=config.error_feedback)

    def factor_shapes(self, numel: int) -> tuple[tuple[int, int], tuple[int, int]]:
        """Shapes of P and Q; the rank is capped by the matrix's smaller side."""
        rows, cols = matrix_shape(numel)
        r = min(self.rank, rows, cols)
        return (rows, r), (cols, r)

    def wire_elements(self, numel: int) -> int:
        """fp32 elements all-reduced per round (P and Q)."""
        (rows, r), (cols, _) = self.factor_shapes(numel)
        return (rows + cols) * r

    def initial_query(self, numel: int, device: torch.device) -> Tensor:
        """The seeded cold-start Q, drawn on the CPU so every member gets the same bits."""
        _, (cols, r) = self.factor_shapes(numel)
        generator = torch.Generator().manual_seed(self.seed)
        return torch.randn(cols, r, generator=generator).to(device)

    def has_warm_query(self, numel: int) -> bool:
        _, shape = self.factor_shapes(numel)
        return self.warm_query is not None and tuple(self.warm_query.shape) == shape

    def query_digest(self) -> float:
        """A number equal on members that hold bitwise-equal warm queries, to check before use."""
        if self.warm_query is None:
            return 0.0
        q = self.warm_query.reshape(-1).double()
        ramp = torch.linspace(1.0, 2.0, q.numel(), dtype=torch.float64, device=q.device)
        return float(torch.dot(q, ramp))

    def start(self, contribution: Tensor, warm: bool) -> PowerSGDRound:
        """Begin a round on `contribution` (+ residual), from the warm Q if `warm` else cold."""
        numel = contribution.numel()
        rows, cols = matrix_shape(numel)
        x = contribution
        if self.error_feedback and self.residual is not None:
            x = x + self.residual
        matrix = torch.nn.functional.pad(x, (0, rows * cols - numel)).view(rows, cols)
        if warm and self.warm_query is not None and self.has_warm_query(numel):
            query = self.warm_query
        else:
            query = self.initial_query(numel, contribution.device)
        return PowerSGDRound(numel=numel, matrix=matrix, query=query)

    def commit(self, round_: PowerSGDRound, q_sum: Tensor) -> None:
        """Keep the round's outcome once all its collectives succeeded."""
        self.warm_query = q_sum
        if self.error_feedback:
            self.residual = round_.residual()

    def compress_locally(self, flat: Tensor, warm: bool = True) -> Tensor:
        """One member's round without peers: what a group of one would decode."""
        round_ = self.start(flat, warm)
        q = round_.local_q_from(round_.local_p())
        decoded = round_.decompress(q)
        self.commit(round_, q.clone())
        return decoded

    def forget_query(self) -> None:
        """Drop the warm start: the next round starts from the seeded Q."""
        self.warm_query = None
