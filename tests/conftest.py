"""Shared test configuration: where the golden fixtures live (copied from the official DR2 code's output)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

FIXTURES = Path(__file__).parent / "fixtures"
DR2_REFERENCE = FIXTURES / "dr2_reference"

# Two cores: keep torch from oversubscribing them when Ray workers run beside the test process.
torch.set_num_threads(2)


@pytest.fixture(scope="session")
def dr2_reference() -> Path:
    return DR2_REFERENCE
