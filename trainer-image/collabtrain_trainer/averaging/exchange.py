"""One round of compressed, sample-weighted gradient averaging over a formed process group.

Compressed payloads do not add up byte-wise (each carries its own scales, top-k supports
differ), so the round is a reduce-scatter and an all-gather built from all_to_all: the
flat vector is cut into one part per rank, rank j owns part j, receives every member's
encoded part j, decodes and sums them, re-encodes the sum and all_gather returns every
part to everyone. PowerSGD's factors do add up, so that codec uses all_reduce instead.
With `all_gather` (SparseLoCo's exchange), every member's whole vector is encoded once and
all_gather brings it to everyone, who decode and sum: nothing is re-encoded, at n-1
payloads per member instead of about 2.

Collectives raise when a peer dies; the caller abandons the round. State (residuals, the
warm PowerSGD query) is committed only after every collective of the call succeeded.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed import ProcessGroup

from collabtrain_trainer.codecs.base import Codec, make_codec
from collabtrain_trainer.codecs.powersgd import PowerSGD
from collabtrain_trainer.config import CompressionConfig

logger = logging.getLogger(__name__)

# Per-rank status in the metadata all_gather.
_OK = 0.0
_NONFINITE_GRADIENT = 1.0
_BAD_WEIGHT = 2.0
_REASONS = {
    _NONFINITE_GRADIENT: "non-finite gradient",
    _BAD_WEIGHT: "non-finite or negative weight",
}

# weight, status, numel, plan (wire size), has warm PowerSGD query, query digest
_META_FIELDS = 6
_META_BYTES = 8 * _META_FIELDS


@dataclass
class ExchangeResult:
    average: Tensor  # flat fp32, the sample-weighted mean of the contributions
    total_weight: float  # sum of weights that were included
    excluded_ranks: list[int]  # ranks whose contribution was non-finite and got weight 0
    bytes_sent: int  # bytes this rank put on the wire in this call
    bytes_fp32_equivalent: int  # what a plain fp32 ring all-reduce would send from this rank


@dataclass(frozen=True)
class _Layout:
    world: int
    rank: int
    numel: int

    @property
    def part(self) -> int:
        return math.ceil(self.numel / self.world)


@dataclass(frozen=True)
class ExchangeSnapshot:
    """An ExchangeState's round-to-round values, to put back when a round is voted down."""

    residual: Tensor | None
    owned_residual: Tensor | None
    layout: _Layout | None
    powersgd_query: Tensor | None
    powersgd_residual: Tensor | None


@dataclass
class ExchangeState:
    """What one peer carries from round to round.

    `residual` is what this peer's own payloads have not yet delivered (full length, in
    units of its share of the average); `owned_residual` is what the re-encoded average of
    the part it owns has not delivered. Both are debts to the group's running sum.
    Tensors held here are replaced, never modified in place, so snapshots share them.
    """

    config: CompressionConfig
    # Stochastic rounding seed; None draws one, so peers never share a rounding stream.
    seed: int | None = None
    # PowerSGD's cold-start query must be equal on every member, hence its own seed.
    powersgd_seed: int = 0
    # The parameters' shapes, in flat-gradient order: PowerSGD factors each matrix alone.
    shapes: Sequence[Sequence[int]] | None = None
    codec: Codec | None = field(init=False)
    powersgd: PowerSGD | None = field(init=False)
    residual: Tensor | None = field(init=False, default=None)
    owned_residual: Tensor | None = field(init=False, default=None)
    _layout: _Layout | None = field(init=False, default=None)
    _generator: torch.Generator | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        if self.config.codec == "powersgd":
            self.codec = None
            self.powersgd = PowerSGD.from_config(
                self.config, seed=self.powersgd_seed, shapes=self.shapes
            )
        else:
            self.codec = make_codec(self.config)
            self.powersgd = None

    @property
    def uses_error_feedback(self) -> bool:
        return self.config.error_feedback and not (self.codec is not None and self.codec.exact)

    def reset(self) -> None:
        """Call when the membership changes: part boundaries move, the warm query is stale.

        The owned part's residual is folded into this peer's own residual, which does not
        depend on the partition, so no debt is forgotten: error feedback survives churn.
        """
        layout, owned = self._layout, self.owned_residual
        if layout is not None and owned is not None:
            start = layout.rank * layout.part
            stop = min(start + layout.part, layout.numel)
            folded = torch.zeros(layout.numel, device=owned.device)
            folded[start:stop] = owned[: stop - start]
            self.residual = folded if self.residual is None else self.residual + folded
        self.owned_residual = None
        self._layout = None
        if self.powersgd is not None:
            self.powersgd.forget_query()

    def snapshot(self) -> ExchangeSnapshot:
        """What restore() needs to undo the rounds that follow; cheap, nothing is copied."""
        psgd = self.powersgd
        return ExchangeSnapshot(
            residual=self.residual,
            owned_residual=self.owned_residual,
            layout=self._layout,
            powersgd_query=psgd.warm_query if psgd is not None else None,
            powersgd_residual=psgd.residual if psgd is not None else None,
        )

    def restore(self, snapshot: ExchangeSnapshot) -> None:
        """Undo rounds whose results were not applied: their residual debts come back."""
        self.residual = snapshot.residual
        self.owned_residual = snapshot.owned_residual
        self._layout = snapshot.layout
        if self.powersgd is not None:
            self.powersgd.warm_query = snapshot.powersgd_query
            self.powersgd.residual = snapshot.powersgd_residual

    def with_residual(self, contribution: Tensor) -> Tensor:
        """This round's contribution plus what earlier rounds' payloads did not deliver
        (faded by the decay), when error feedback is on."""
        if not self.uses_error_feedback or self.residual is None:
            return contribution
        return contribution + self.config.error_feedback_decay * self.residual

    def _enter(self, layout: _Layout) -> None:
        if self._layout is not None and self._layout != layout:
            logger.warning(
                "exchange layout changed from %s to %s without reset(); resetting now",
                self._layout,
                layout,
            )
            self.reset()
        self._layout = layout

    def _rng(self, device: torch.device) -> torch.Generator:
        if self._generator is None or self._generator.device != device:
            generator = torch.Generator(device=device)
            if self.seed is None:
                generator.seed()
            else:
                generator.manual_seed(self.seed)
            self._generator = generator
        return self._generator


def _status(flat_grad: Tensor, weight: float) -> float:
    if not math.isfinite(weight) or weight < 0:
        return _BAD_WEIGHT
    if not bool(torch.isfinite(flat_grad).all()):
        return _NONFINITE_GRADIENT
    return _OK


def _ring_allreduce_bytes(nbytes: int, world: int) -> int:
    """What one rank sends in a ring all-reduce of `nbytes`: 2 (n-1)/n of it."""
    return 2 * (world - 1) * nbytes // world


def average(
    flat_grad: Tensor,
    weight: float,
    group: ProcessGroup,
    state: ExchangeState,
    expected_weights: Sequence[float] | None = None,
) -> ExchangeResult:
    """Average `flat_grad` over the group, weighted by `weight` (this peer's sample count).

    Every rank of the group must call this with the same numel and codec. A rank whose
    gradient or weight is not finite takes part with weight 0 and is reported as excluded.
    With `expected_weights` (by rank, what the coordinator recorded), a rank that declares
    any other weight fails the call on every honest rank before any gradient moves.
    """
    if flat_grad.dim() != 1 or flat_grad.dtype != torch.float32:
        raise ValueError(
            f"average takes a flat float32 gradient, got shape {tuple(flat_grad.shape)} "
            f"dtype {flat_grad.dtype}"
        )
    world = dist.get_world_size(group)
    layout = _Layout(world=world, rank=dist.get_rank(group), numel=flat_grad.numel())
    state._enter(layout)
    device = flat_grad.device
    psgd = state.powersgd
    if psgd is not None:
        plan = psgd.wire_elements(layout.numel)
    else:
        assert state.codec is not None
        plan = state.codec.wire_bytes(layout.numel if state.config.all_gather else layout.part)

    status = _status(flat_grad, weight)
    meta = torch.tensor(
        [
            weight if status == _OK else 0.0,
            status,
            layout.numel,
            plan,
            float(psgd is not None and psgd.has_warm_query(layout.numel)),
            psgd.query_digest() if psgd is not None else 0.0,
        ],
        dtype=torch.float64,
        device=device,
    )
    gathered = [torch.empty_like(meta) for _ in range(world)]
    dist.all_gather(gathered, meta, group=group)
    table = torch.stack(gathered).cpu()
    bytes_sent = (world - 1) * _META_BYTES

    if not (bool((table[:, 2] == layout.numel).all()) and bool((table[:, 3] == plan).all())):
        raise ValueError(
            f"peers disagree on the gradient size or codec: numel per rank "
            f"{table[:, 2].tolist()}, wire plan per rank {table[:, 3].tolist()}; every "
            "peer must run the same model and compression config"
        )
    if expected_weights is not None:
        if len(expected_weights) != world:
            raise ValueError(f"{len(expected_weights)} expected weights for {world} ranks")
        declared = table[:, 0].tolist()
        wrong = [
            f"rank {i} declared weight {declared[i]:g}"
            for i in range(world)
            if table[i, 1].item() == _OK and declared[i] != float(expected_weights[i])
        ]
        if wrong:
            raise ValueError(
                f"{', '.join(wrong)}; the coordinator recorded {list(expected_weights)}"
            )
    excluded = [i for i in range(world) if table[i, 1].item() != _OK]
    for i in excluded:
        logger.warning(
            "excluding rank %d from this round's average: %s", i, _REASONS[table[i, 1].item()]
        )
    total = float(table[:, 0].sum())
    fp32_equivalent = _ring_allreduce_bytes(4 * layout.numel, world)
    if total <= 0:
        # Every rank sees the same table, so every rank skips the payload collectives.
        return ExchangeResult(
            average=torch.zeros_like(flat_grad),
            total_weight=0.0,
            excluded_ranks=excluded,
            bytes_sent=bytes_sent,
            bytes_fp32_equivalent=fp32_equivalent,
        )
    # Excluded ranks contribute zeros but still flush their residual: it is finite.
    share = weight / total if status == _OK else 0.0
    contribution = flat_grad * share if status == _OK else torch.zeros_like(flat_grad)

    if psgd is not None:
        warm = bool((table[:, 4] == 1).all()) and bool((table[:, 5] == table[0, 5]).all())
        result, sent = _powersgd_round(contribution, psgd, warm, group, world)
    elif state.config.all_gather:
        assert state.codec is not None
        result, sent = _gather_round(contribution, state, state.codec, layout, group, device)
    else:
        assert state.codec is not None
        result, sent = _part_round(contribution, state, state.codec, layout, group, device)
    if not bool(torch.isfinite(result).all()):
        # A member declared its contribution finite and sent NaN or Inf anyway (or huge
        # values overflowed): applying it would wreck the model on every member alike.
        # Raised on every rank, so the round is voted down; the caller restores `state`.
        raise ValueError("the averaged gradient is not finite; refusing the round")
    return ExchangeResult(
        average=result,
        total_weight=total,
        excluded_ranks=excluded,
        bytes_sent=bytes_sent + sent,
        bytes_fp32_equivalent=fp32_equivalent,
    )


def _part_round(
    contribution: Tensor,
    state: ExchangeState,
    codec: Codec,
    layout: _Layout,
    group: ProcessGroup,
    device: torch.device,
) -> tuple[Tensor, int]:
    """Reduce-scatter by all_to_all to part owners, then all_gather of the re-encoded parts."""
    world, me, part, numel = layout.world, layout.rank, layout.part, layout.numel
    wire = codec.wire_bytes(part)
    feedback = state.uses_error_feedback
    generator = state._rng(device)

    decay = state.config.error_feedback_decay
    x = state.with_residual(contribution)
    parts = torch.nn.functional.pad(x, (0, world * part - numel)).view(world, part)
    send = torch.zeros(world * wire, dtype=torch.uint8, device=device)
    delivered = parts.clone()  # what the owners will decode; our own part needs no codec
    for j in range(world):
        if j == me:
            continue
        payload, decoded = codec.roundtrip(parts[j], generator)
        send[j * wire : (j + 1) * wire] = payload
        delivered[j] = decoded
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)

    owned = parts[me].clone()
    for i in range(world):
        if i != me:
            owned += codec.decode(recv[i * wire : (i + 1) * wire], part)
    if feedback and state.owned_residual is not None:
        owned += decay * state.owned_residual
    payload, decoded_owned = codec.roundtrip(owned, generator)
    gathered = [torch.empty_like(payload) for _ in range(world)]
    dist.all_gather(gathered, payload, group=group)
    result = torch.cat(
        [decoded_owned if j == me else codec.decode(gathered[j], part) for j in range(world)]
    )[:numel]

    if feedback:
        state.residual = (x - delivered.reshape(-1)[:numel]).contiguous()
        state.owned_residual = owned - decoded_owned
    return result, 2 * (world - 1) * wire


def _gather_round(
    contribution: Tensor,
    state: ExchangeState,
    codec: Codec,
    layout: _Layout,
    group: ProcessGroup,
    device: torch.device,
) -> tuple[Tensor, int]:
    """Encode the whole vector once, all_gather every member's payload, decode and sum."""
    x = state.with_residual(contribution)
    payload, decoded = codec.roundtrip(x, state._rng(device))
    gathered = [torch.empty_like(payload) for _ in range(layout.world)]
    dist.all_gather(gathered, payload, group=group)
    result = torch.zeros_like(x)
    for member in gathered:  # in rank order on every member: the sums agree to the bit
        result += codec.decode(member, layout.numel)
    if state.uses_error_feedback:
        state.residual = (x - decoded).contiguous()
    return result, (layout.world - 1) * codec.wire_bytes(layout.numel)


def _powersgd_round(
    contribution: Tensor, psgd: PowerSGD, warm: bool, group: ProcessGroup, world: int
) -> tuple[Tensor, int]:
    """Sum P (and the plain stretches) over members, orthonormalize, sum Q, decompress."""
    round_ = psgd.start(contribution, warm)
    p = round_.local_p()
    dist.all_reduce(p, group=group)
    q = round_.local_q_from(p).clone()
    if q.numel():  # nothing to send when no parameter is a matrix worth factoring
        dist.all_reduce(q, group=group)
    result = round_.decompress(q)
    psgd.commit(round_, q)
    sent = _ring_allreduce_bytes(4 * p.numel(), world) + _ring_allreduce_bytes(4 * q.numel(), world)
    return result, sent
