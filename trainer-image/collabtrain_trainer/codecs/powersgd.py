"""PowerSGD (Vogels et al., 2019): rank-r approximations found by one power iteration.

Each weight matrix's gradient M (out x in, conv kernels flattened to out x rest) is
approximated on its own. With a query Q (in x r) shared by all members, every member's
P_i = M_i Q sums to (sum M_i) Q, so the factors travel through all_reduce: sum P,
orthonormalize it to P^, sum Q_i = M_i^T P^, and P^ (sum Q_i)^T approximates sum M_i.
Q is warm-started from the previous round, which makes one iteration per round enough;
a cold start uses the same seeded Q everywhere. Vectors (biases, norms) and matrices too
small to gain from a factorisation are summed as they are, in the same all_reduce as P.

Without parameter shapes the flat gradient is one near-square matrix, which works but
approximates a reshuffle that is rarely low-rank: give the shapes.
This does not fit the part codecs' encode/decode of independent pieces, hence its own API.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

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


@dataclass(frozen=True)
class Block:
    """A stretch [start, start + numel) of the flat gradient.

    rank > 0: a rows x cols matrix sent as rank-r factors (zero-padded when the stretch
    does not fill it); rank 0: summed as it is.
    """

    start: int
    numel: int
    rows: int = 0
    cols: int = 0
    rank: int = 0

    @property
    def stop(self) -> int:
        return self.start + self.numel

    def matrix(self, flat: Tensor) -> Tensor:
        stretch = flat[self.start : self.stop]
        padding = self.rows * self.cols - self.numel
        if padding:
            stretch = torch.nn.functional.pad(stretch, (0, padding))
        return stretch.view(self.rows, self.cols)  # a view, not a copy, when it fits


def plan_blocks(numel: int, rank: int, shapes: Sequence[Sequence[int]] | None) -> list[Block]:
    """Low-rank blocks for the matrices that gain from factors, plain blocks for the rest."""
    if shapes is None:
        rows, cols = matrix_shape(numel)
        return [Block(0, numel, rows, cols, min(rank, rows, cols))] if numel else []
    sizes = [math.prod(shape) for shape in shapes]
    if sum(sizes) != numel:
        raise ValueError(
            f"PowerSGD was given parameter shapes holding {sum(sizes)} elements for a "
            f"gradient of {numel}: pass the shapes of the parameters the gradient is made of"
        )
    blocks: list[Block] = []
    start = 0
    for shape, size in zip(shapes, sizes, strict=True):
        rows, cols = (shape[0], size // shape[0]) if len(shape) >= 2 and size else (0, 0)
        r = min(rank, rows, cols)
        if r and (rows + cols) * r < size:
            blocks.append(Block(start, size, rows, cols, r))
        elif blocks and blocks[-1].rank == 0:  # blocks are contiguous: extend the last
            blocks[-1] = Block(blocks[-1].start, blocks[-1].numel + size)
        elif size:
            blocks.append(Block(start, size))
        start += size
    return blocks


def _split(flat: Tensor, sizes: list[int]) -> list[Tensor]:
    return list(torch.split(flat, sizes)) if sizes else []


@dataclass
class PowerSGDRound:
    """One round's local values between the all_reduce of P and the all_reduce of Q."""

    numel: int
    blocks: list[Block]
    x: Tensor  # this member's contribution plus residual, flat
    queries: list[Tensor]  # the shared Q per low-rank block, cols x r
    matrices: list[Tensor] = field(init=False)
    p_hats: list[Tensor] = field(init=False, default_factory=list)
    local_qs: list[Tensor] = field(init=False, default_factory=list)
    plain_sum: Tensor | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        self.matrices = [b.matrix(self.x) for b in self.low_rank]

    @property
    def low_rank(self) -> list[Block]:
        return [b for b in self.blocks if b.rank]

    @property
    def plain(self) -> list[Block]:
        return [b for b in self.blocks if not b.rank]

    def local_p(self) -> Tensor:
        """This member's P_i = M_i Q per matrix, then its plain stretches: to be summed."""
        ps = [(m @ q).reshape(-1) for m, q in zip(self.matrices, self.queries, strict=True)]
        plain = [self.x[b.start : b.stop] for b in self.plain]
        return torch.cat([*ps, *plain]) if ps or plain else self.x.new_zeros(0)

    def local_q_from(self, p_sum: Tensor) -> Tensor:
        """This member's Q_i = M_i^T P^ per matrix given the summed P, to be summed."""
        sizes = [b.rows * b.rank for b in self.low_rank]
        p_flat, self.plain_sum = p_sum[: sum(sizes)], p_sum[sum(sizes) :]
        self.p_hats = [
            orthonormalize(p.view(b.rows, b.rank))
            for p, b in zip(_split(p_flat, sizes), self.low_rank, strict=True)
        ]
        self.local_qs = [m.T @ p for m, p in zip(self.matrices, self.p_hats, strict=True)]
        if not self.local_qs:
            return self.x.new_zeros(0)
        return torch.cat([q.reshape(-1) for q in self.local_qs])

    def decompress(self, q_sum: Tensor) -> Tensor:
        """The flat approximation P^ (sum Q_i)^T per matrix, plain stretches as summed."""
        if self.plain_sum is None:
            raise RuntimeError("local_q_from must run before decompress")
        out = torch.empty(self.numel, dtype=self.x.dtype, device=self.x.device)
        qs = _split(q_sum, [b.cols * b.rank for b in self.low_rank])
        for b, p_hat, q in zip(self.low_rank, self.p_hats, qs, strict=True):
            out[b.start : b.stop] = (p_hat @ q.view(b.cols, b.rank).T).reshape(-1)[: b.numel]
        plain_parts = _split(self.plain_sum, [b.numel for b in self.plain])
        for b, part in zip(self.plain, plain_parts, strict=True):
            out[b.start : b.stop] = part
        return out

    def residual(self) -> Tensor:
        """What this member's own contribution lost: M_i - P^ P^T M_i per matrix, flat."""
        if self.plain_sum is None:
            raise RuntimeError("local_q_from must run before residual")
        out = torch.zeros_like(self.x)
        for b, m, p_hat, q in zip(
            self.low_rank, self.matrices, self.p_hats, self.local_qs, strict=True
        ):
            out[b.start : b.stop] = (m - p_hat @ q.T).reshape(-1)[: b.numel]
        return out


class PowerSGD:
    """Per-member PowerSGD state: the warm-start queries and the error-feedback residual.

    The residual is this member's own projection error (not the gap to the group's
    average), so it stays meaningful when the membership changes; the warm queries do
    not, because every member must start a round from the same Q.
    """

    def __init__(
        self,
        rank: int,
        seed: int = 0,
        error_feedback: bool = True,
        shapes: Sequence[Sequence[int]] | None = None,
        error_feedback_decay: float = 1.0,
    ) -> None:
        if rank < 1:
            raise ValueError(f"PowerSGD rank must be at least 1, got {rank}")
        self.rank = rank
        self.seed = seed
        self.error_feedback = error_feedback
        self.error_feedback_decay = error_feedback_decay
        self.shapes = [tuple(s) for s in shapes] if shapes is not None else None
        self.warm_query: Tensor | None = None  # every block's Q, flat, in block order
        self.residual: Tensor | None = None
        self._plans: dict[int, list[Block]] = {}

    @classmethod
    def from_config(
        cls,
        config: CompressionConfig,
        seed: int = 0,
        shapes: Sequence[Sequence[int]] | None = None,
    ) -> PowerSGD:
        return cls(
            rank=config.rank,
            seed=seed,
            error_feedback=config.error_feedback,
            shapes=shapes,
            error_feedback_decay=config.error_feedback_decay,
        )

    def blocks(self, numel: int) -> list[Block]:
        if numel not in self._plans:
            self._plans[numel] = plan_blocks(numel, self.rank, self.shapes)
        return self._plans[numel]

    def wire_elements(self, numel: int) -> int:
        """fp32 elements all-reduced per round: P and plain stretches, then Q."""
        return sum((b.rows + b.cols) * b.rank or b.numel for b in self.blocks(numel))

    def query_elements(self, numel: int) -> int:
        return sum(b.cols * b.rank for b in self.blocks(numel))

    def initial_query(self, numel: int, device: torch.device) -> Tensor:
        """The seeded cold-start Q of every block, drawn on the CPU so all members agree."""
        generator = torch.Generator().manual_seed(self.seed)
        return torch.randn(self.query_elements(numel), generator=generator).to(device)

    def has_warm_query(self, numel: int) -> bool:
        return self.warm_query is not None and self.warm_query.numel() == self.query_elements(numel)

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
        blocks = self.blocks(numel)
        x = contribution
        if self.error_feedback and self.residual is not None:
            x = x + self.error_feedback_decay * self.residual
        if warm and self.warm_query is not None and self.has_warm_query(numel):
            flat_query = self.warm_query
        else:
            flat_query = self.initial_query(numel, contribution.device)
        low_rank = [b for b in blocks if b.rank]
        queries = [
            q.view(b.cols, b.rank)
            for q, b in zip(
                _split(flat_query, [b.cols * b.rank for b in low_rank]), low_rank, strict=True
            )
        ]
        return PowerSGDRound(numel=numel, blocks=blocks, x=x, queries=queries)

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
