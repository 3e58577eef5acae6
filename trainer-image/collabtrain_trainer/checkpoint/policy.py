"""When the checkpoint writer should take a snapshot. Pure."""

from __future__ import annotations

import time

from collabtrain_trainer.config import CheckpointConfig


def should_checkpoint(
    step: int,
    last_step: int | None,
    last_time: float | None,
    config: CheckpointConfig,
    *,
    now: float | None = None,
) -> bool:
    """Whether committed step `step` is due for a checkpoint.

    `last_step` / `last_time` describe the last checkpoint *taken* (snapshot submitted, not
    necessarily uploaded: a slow store must not make every step due); None when there was
    none, in which case the first committed step is due so a restart never goes back to
    step 0. `last_time` and `now` are `time.monotonic()` seconds unless `now` is given on
    another clock.

    Due when `every_steps` steps have passed since `last_step`, or `every_minutes` since
    `last_time`; either trigger is enough. With neither set, checkpoints are taken only
    on request (always False here).
    """
    if config.every_steps is None and config.every_minutes is None:
        return False
    if last_step is not None and step <= last_step:
        return False  # nothing new since the last snapshot
    if last_step is None or last_time is None:
        return True
    if config.every_steps is not None and step - last_step >= config.every_steps:
        return True
    if config.every_minutes is None:
        return False
    current = time.monotonic() if now is None else now
    return current - last_time >= config.every_minutes * 60.0
