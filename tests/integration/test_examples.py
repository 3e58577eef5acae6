"""Every manifest in examples/ is accepted by a real API server with the committed CRD."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "examples").rglob("*.yaml"))


@pytest.fixture(scope="module")
def crd_installed(kubectl: Any) -> None:
    crd = ROOT / "crds" / "collaborativetrainingjobs.collabtrain.io.yaml"
    kubectl("apply", "--server-side", "--force-conflicts", "-f", str(crd))
    kubectl(
        "wait",
        "--for=condition=Established",
        "--timeout=60s",
        "crd/collaborativetrainingjobs.collabtrain.io",
    )


@pytest.mark.parametrize("example", EXAMPLES, ids=[path.name for path in EXAMPLES])
def test_example_is_valid(example: Path, kubectl: Any, crd_installed: None, namespace: str) -> None:
    result = kubectl("apply", "--dry-run=server", "-n", namespace, "-f", str(example), check=False)
    assert result.returncode == 0, result.stderr
    assert "created (server dry run)" in result.stdout
