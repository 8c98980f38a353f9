"""What every frozen config dataclass shares: building one from a dict (config.json, a CLI) refuses unknown keys
and names the known ones, so a typo or a config from another version never passes silently."""

from __future__ import annotations

import dataclasses
from typing import Any


def check_known_keys(cls: type[Any], d: dict[str, Any]) -> None:
    """Raise ValueError naming any key of ``d`` that is not a field of dataclass ``cls``."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} keys {unknown}; known keys: {sorted(known)}")
