"""One round from a peer's side: formation (all members ready), the exchange (the
compressed average over the round's process group) and the vote, until the coordinator's
decision. Applying a committed average is the caller's (`peer.runtime`): the round leaves
the peer's state untouched, so an abandoned round loses nothing."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
from opentelemetry.trace import Tracer
from torch import Tensor

from collabtrain_trainer.averaging.exchange import ExchangeResult, ExchangeState, average
from collabtrain_trainer.averaging.groups import EpochGroups, default_backend
from collabtrain_trainer.config import TrainerConfig
from collabtrain_trainer.peer.client import (
    CoordinatorClient,
    CoordinatorUnavailable,
    RejoinRequired,
)
from collabtrain_trainer.protocol import (
    RoundAssignment,
    RoundDecision,
    RoundReady,
    RoundVote,
)

log = logging.getLogger("collabtrain.peer")

# How long before the round's deadline the collectives give up at the most.
_VOTE_MARGIN_S = 2.0
# How long past the round deadline a peer waits for the coordinator's decision.
_DECISION_SLACK_S = 10.0


@dataclass(frozen=True)
class Committed:
    """A round the coordinator committed: the average to apply and what it was made of."""

    result: ExchangeResult
    decision: RoundDecision
    weight: float  # this peer's


@dataclass(frozen=True)
class Contribution:
    """What this peer brings to a round (it trains no more until the round ends)."""

    vector: Callable[[], Tensor]  # the (pseudo-)gradient, built when the exchange starts
    samples: int
    loss: float | None


class Rounds:
    def __init__(
        self,
        config: TrainerConfig,
        client: CoordinatorClient,
        peer_id: str,
        device: torch.device,
        shapes: list[torch.Size],
        rejoin: threading.Event,
        meter: Any,
        tracer: Tracer,
    ) -> None:
        self.config = config
        self.client = client
        self.peer_id = peer_id
        self.shapes = shapes
        self.rejoin = rejoin  # set when the coordinator is lost mid-round
        self.tracer = tracer
        self.groups = EpochGroups(client.rendezvous, peer_id, default_backend(device))
        self.exchange_state = self._fresh_exchange_state()
        self._rounds_counter = meter.create_counter(
            "collabtrain_peer_rounds", description="by outcome"
        )
        self._bytes_counter = meter.create_counter("collabtrain_peer_bytes_sent", unit="By")
        self._phase_seconds = meter.create_histogram(
            "collabtrain_peer_round_phase_seconds", unit="s"
        )

    def _fresh_exchange_state(self) -> ExchangeState:
        """Zero residuals and no warm query: what a peer owes starts from nothing."""
        return ExchangeState(
            self.config.compression, powersgd_seed=self.config.seed, shapes=self.shapes
        )

    def forget_residuals(self) -> None:
        """For a state loaded from elsewhere: what others owed is not this peer's to send."""
        self.exchange_state = self._fresh_exchange_state()

    def close(self) -> None:
        self.groups.close()

    def take_part(
        self, assignment: RoundAssignment, contribution: Contribution, step: int
    ) -> Committed | None:
        """Run the round to its decision; the committed average, or None (abandoned). The
        caller holds the round's span and log context, which its apply belongs to."""
        deadline = time.monotonic() + assignment.deadline_seconds
        committed = self._phases(assignment, contribution, step, deadline)
        self._rounds_counter.add(1, {"outcome": "commit" if committed else "abort"})
        if committed is not None:
            self._bytes_counter.add(committed.result.bytes_sent)
        return committed

    def _lost(self, round_id: int, step: int, error: Exception) -> RoundDecision:
        self.rejoin.set()
        return RoundDecision(
            round_id=round_id, outcome="abort", step=step, reason=f"coordinator lost: {error}"
        )

    def _phases(
        self,
        assignment: RoundAssignment,
        contribution: Contribution,
        step: int,
        deadline: float,
    ) -> Committed | None:
        with self.tracer.start_as_current_span("formation"):
            phase_start = time.monotonic()
            try:
                ready = self.client.await_ready(
                    RoundReady(peer_id=self.peer_id, round_id=assignment.round_id), until=deadline
                )
            except (RejoinRequired, CoordinatorUnavailable) as error:
                ready = self._lost(assignment.round_id, step, error)
            self._phase_seconds.record(time.monotonic() - phase_start, {"phase": "formation"})
        if ready.outcome != "go":
            log.info(
                "round %d abandoned before the exchange: %s", assignment.round_id, ready.reason
            )
            return None

        # Average with the weights the coordinator recorded (all members use the same).
        weights = ready.weights
        weight = float(weights[assignment.rank] if weights else contribution.samples)
        saved_exchange = self.exchange_state.snapshot()
        result: ExchangeResult | None = None
        reason = ""
        with self.tracer.start_as_current_span("exchange"):
            phase_start = time.monotonic()
            try:
                epoch_changed = (
                    self.groups.epoch_key is None
                    or self.groups.epoch_key[0] != assignment.store_prefix
                )
                # The collectives give up a little before the round's deadline, so that
                # a failed exchange is voted failed (and counted as one) in time.
                margin = min(_VOTE_MARGIN_S, 0.2 * assignment.deadline_seconds)
                timeout = timedelta(seconds=max(1.0, deadline - margin - time.monotonic()))
                group = self.groups.get(
                    assignment.store_prefix, assignment.rank, assignment.world_size, timeout
                )
                if epoch_changed:
                    self.exchange_state.reset()  # part boundaries and members changed
                result = average(contribution.vector(), weight, group, self.exchange_state, weights)
            except Exception as error:
                reason = f"{type(error).__name__}: {error}".splitlines()[0][:300]
                log.warning("exchange failed in round %d: %s", assignment.round_id, reason)
                self.groups.close()
            exchange_seconds = time.monotonic() - phase_start
            self._phase_seconds.record(exchange_seconds, {"phase": "exchange"})

        vote = RoundVote(
            peer_id=self.peer_id,
            round_id=assignment.round_id,
            ok=result is not None,
            reason=reason,
            weight=weight,
            total_weight=result.total_weight if result else 0.0,
            loss=contribution.loss,
            excluded_ranks=result.excluded_ranks if result else [],
            bytes_sent=result.bytes_sent if result else 0,
            bytes_fp32_equivalent=result.bytes_fp32_equivalent if result else 0,
            exchange_seconds=exchange_seconds,
        )
        try:
            decision = self.client.await_decision(vote, until=deadline + _DECISION_SLACK_S)
        except (RejoinRequired, CoordinatorUnavailable) as error:
            # Nobody here knows whether the round committed; a restarted coordinator adopts
            # the highest step peers report and re-syncs the others, so abandon it.
            decision = self._lost(assignment.round_id, step, error)
        if decision.outcome != "commit" or result is None:
            # The peer's state is untouched: the next round sends its progress again.
            self.exchange_state.restore(saved_exchange)
            if result is not None:
                self.groups.close()
            log.info("round %d aborted: %s", assignment.round_id, decision.reason)
            return None
        for rank in result.excluded_ranks:
            log.warning(
                "round %d: %s excluded from the average (non-finite gradient)",
                assignment.round_id,
                assignment.members[rank],
            )
        return Committed(result=result, decision=decision, weight=weight)
