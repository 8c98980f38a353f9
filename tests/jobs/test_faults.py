"""Faults a real deployment meets, automated: S3 throttling, server errors and connections cut mid-download and
mid-upload (a fault proxy on loopback in front of the real S3 server), and a full local disk (a small tmpfs).
Every shard must come out right or not at all, and a rerun must finish the job with nothing left behind."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from jobs.cli import main
from pipeline.config import PipelineConfig, RestorerKind
from pipeline.runner.loop import run_restore
from pipeline.store import storage
from tests.faultproxy import FaultProxy
from tests.jobs.archive import build_archive
from tests.s3server import S3Server

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_local")]


def upload_dir(local: Path, prefix: str) -> None:
    for p in sorted(local.rglob("*")):
        if p.is_file():
            storage.write_bytes_atomic(f"{prefix}/{p.relative_to(local).as_posix()}", p.read_bytes())


def test_s3_faults_leave_every_shard_right(s3_server: S3Server, s3_bucket: str, tmp_path: Path) -> None:
    build_archive(tmp_path / "in")
    base = f"s3://{s3_bucket}"
    upload_dir(tmp_path / "in", f"{base}/in")
    common = {"restorer": RestorerKind.PASSTHROUGH, "progress": "quiet", "report": False}
    clean = run_restore(PipelineConfig(src=f"{base}/in/", dst=f"{base}/clean", **common))
    proxy = FaultProxy(int(s3_server.endpoint_url.rsplit(":", 1)[1]),
                       [(5, "slowdown"), (7, "internal"), (3, "cut_download"), (4, "cut_upload")])
    try:
        faulty = run_restore(PipelineConfig(src=f"{base}/in/", dst=f"{base}/faulty", endpoint_url=proxy.endpoint_url,
                                            **common))
    finally:
        proxy.close()
    assert set(proxy.injected) == {"slowdown", "internal", "cut_download", "cut_upload"}, proxy.injected
    assert faulty.failed == {} and faulty.samples == clean.samples and faulty.statuses == clean.statuses
    for name in ("shard-000.tar", "shard-001.tar", "shard-002.tar"):
        assert storage.read_bytes(f"{base}/faulty/{name}") == storage.read_bytes(f"{base}/clean/{name}"), name
    client = s3_server.client()
    assert not client.list_multipart_uploads(Bucket=s3_bucket).get("Uploads")  # type: ignore[attr-defined]
    assert not storage.list_prefix(f"{base}/faulty/_dr2_staging/")


DISK_KIB = 4096  # room for the run's staging parts and outputs (3 x ~0.5 MB here), lease, config and markers


@pytest.fixture()
def small_disk(tmp_path: Path) -> Path:
    mount = tmp_path / "disk"
    mount.mkdir()
    if shutil.which("mount") is None or subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={DISK_KIB}k", "tmpfs", str(mount)], capture_output=True
    ).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root): the full-disk case is not run")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_is_one_line_and_a_rerun_finishes(small_disk: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    build_archive(tmp_path / "in")
    src = str(tmp_path / "in" / "shard-{000..002}.tar")
    dst = small_disk / "out"
    args = ["restore", src, str(dst), "--restorer", "passthrough", "--progress", "quiet", "--no-report"]
    filler = small_disk / "filler"
    filler.write_bytes(b"\0" * ((DISK_KIB - 40) * 1024))  # leaves ~40 KiB: the first staged part does not fit
    code = main(args)
    err = capsys.readouterr().err
    assert code in (1, 2) and err.strip(), err
    assert "no space left" in err.lower() and "rerun" in err and "Traceback" not in err, err
    for marker in dst.glob("*.stats.json"):  # whatever was committed is whole
        assert (dst / marker.name.replace(".stats.json", ".tar")).is_file()
    filler.unlink()
    assert main(args) == 0
    capsys.readouterr()
    assert sorted(p.name for p in dst.glob("*.tar")) == ["shard-000.tar", "shard-001.tar", "shard-002.tar"]
    assert not list(dst.rglob("*.tmp")) and not list(dst.glob("_dr2_staging/*"))
