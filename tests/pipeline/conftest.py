"""Fixtures shared by the pipeline tests."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(params=["local", "s3"])
def root(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh, empty root URI: a local directory or an S3 bucket."""
    if request.param == "local":
        return str(tmp_path / "root")
    return "s3://" + request.getfixturevalue("s3_bucket")
