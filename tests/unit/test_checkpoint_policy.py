"""When to checkpoint, how to back off, and what never reaches a log."""

from __future__ import annotations

import random
import time

import certifi
import pytest
from hypothesis import given
from hypothesis import strategies as st

from collabtrain_trainer.checkpoint.policy import should_checkpoint
from collabtrain_trainer.checkpoint.storage import (
    CheckpointStorageError,
    Credentials,
    CredentialsError,
    credentials_from_env,
    describe_error,
    make_http_client,
    redact,
)
from collabtrain_trainer.checkpoint.writer import backoff_delay
from collabtrain_trainer.config import CheckpointConfig


def config(**fields: object) -> CheckpointConfig:
    return CheckpointConfig.model_validate({"endpoint": "s3.local:9000", "bucket": "b", **fields})


def test_without_triggers_nothing_is_due() -> None:
    assert not should_checkpoint(10, None, None, config(), now=0.0)


def test_first_committed_step_is_due() -> None:
    assert should_checkpoint(1, None, None, config(every_steps=100), now=0.0)


def test_every_steps() -> None:
    cfg = config(every_steps=10)
    assert not should_checkpoint(19, 10, 0.0, cfg, now=1e9)
    assert should_checkpoint(20, 10, 0.0, cfg, now=0.0)
    assert should_checkpoint(27, 10, 0.0, cfg, now=0.0)  # a skipped boundary still counts


def test_every_minutes() -> None:
    cfg = config(every_minutes=2)
    assert not should_checkpoint(11, 10, 100.0, cfg, now=219.0)
    assert should_checkpoint(11, 10, 100.0, cfg, now=220.0)


def test_either_trigger_is_enough() -> None:
    cfg = config(every_steps=50, every_minutes=1)
    assert should_checkpoint(60, 10, 100.0, cfg, now=101.0)
    assert should_checkpoint(11, 10, 100.0, cfg, now=160.0)
    assert not should_checkpoint(11, 10, 100.0, cfg, now=159.0)


def test_no_new_step_no_checkpoint() -> None:
    cfg = config(every_minutes=1)
    assert not should_checkpoint(10, 10, 0.0, cfg, now=1e9)


def test_default_clock_is_monotonic() -> None:
    cfg = config(every_minutes=1)
    assert not should_checkpoint(11, 10, time.monotonic(), cfg)
    assert should_checkpoint(11, 10, time.monotonic() - 61, cfg)


@given(st.integers(0, 100), st.floats(0.01, 5), st.floats(5, 120))
def test_backoff_is_jittered_and_capped(attempt: int, initial: float, cap: float) -> None:
    delay = backoff_delay(attempt, initial, cap, random.Random(attempt))
    assert 0.0 <= delay <= min(cap, initial * 2**attempt)


def test_backoff_grows() -> None:
    rng = random.Random(0)
    early = [backoff_delay(0, 1.0, 60.0, rng) for _ in range(200)]
    late = [backoff_delay(5, 1.0, 60.0, rng) for _ in range(200)]
    assert max(early) <= 1.0 < max(late) <= 32.0
    assert len(set(late)) > 100  # jitter: writers do not retry in lockstep


def test_credentials_come_from_the_named_variables() -> None:
    cfg = config(access_key_env="MY_AK", secret_key_env="MY_SK")
    creds = credentials_from_env(cfg, {"MY_AK": "ak", "MY_SK": "sk-secret"})
    assert (creds.access_key, creds.secret_key) == ("ak", "sk-secret")
    assert "sk-secret" not in repr(creds)
    assert "AKID" not in repr(Credentials("AKID", "x"))


def test_missing_credentials_name_the_variables() -> None:
    cfg = config(access_key_env="MY_AK", secret_key_env="MY_SK")
    with pytest.raises(CredentialsError, match="variable\\(s\\) MY_SK "):
        credentials_from_env(cfg, {"MY_AK": "ak"})


def test_redaction_removes_keys_and_signatures() -> None:
    text = (
        "GET /b/k?X-Amz-Credential=AKIA123%2F2024&X-Amz-Signature=deadbeef failed; "
        "Authorization: AWS4-HMAC-SHA256 Credential=AKIA123/20240101, Signature=abc123 "
        "secret=s3cr3t-key"
    )
    clean = redact(text, ("s3cr3t-key", "AKIA123"))
    for fragment in ("s3cr3t-key", "AKIA123", "deadbeef", "abc123"):
        assert fragment not in clean
    assert "X-Amz-Credential=***" in clean


def test_error_descriptions_say_what_failed() -> None:
    message = describe_error(ConnectionRefusedError("refused"), "uploading k")
    assert message.startswith("uploading k: ConnectionRefusedError")


def test_missing_ca_bundle_is_reported_with_the_field() -> None:
    with pytest.raises(CheckpointStorageError, match="ca_bundle_path"):
        make_http_client(config(ca_bundle_path="/nonexistent/ca.pem"))


def test_ca_bundle_is_used_for_tls() -> None:
    client = make_http_client(config(ca_bundle_path=certifi.where()))
    assert client.connection_pool_kw["ca_certs"] == certifi.where()
    assert client.connection_pool_kw["cert_reqs"] == "CERT_REQUIRED"
