"""The README's first command: ``dr2 demo`` builds its archive, restores it and writes a preview."""

from __future__ import annotations

import json

import cv2
import pytest
import webdataset as wds

from jobs.cli import main

pytestmark = pytest.mark.usefixtures("ray_local")


def test_demo_restores_its_archive_and_writes_a_preview(tmp_path, capsys) -> None:
    assert main(["demo", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "TINY RANDOM" in out and "preview" in out
    statuses = {}
    for shard in ("shard-000.tar", "shard-001.tar"):
        for sample in wds.WebDataset(str(tmp_path / "restored" / shard), shardshuffle=False):
            statuses[sample["__key__"]] = json.loads(sample["dr2.json"])["status"]
    assert statuses == {"astronaut_x4": "ok", "hopper_x8": "ok", "coffee": "no_face", "hopper_x4": "ok",
                        "corrupt": "decode_error", "caption_only": "no_image"}
    preview = cv2.imread(str(tmp_path / "preview.png"))
    assert preview is not None and preview.shape[1] == 512 and preview.shape[0] == 32 + 5 * 256  # banner + 5 rows
