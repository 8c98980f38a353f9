"""pipeline/formats/wds.py: WebDataset tars read and written through the real webdataset library, on the local
filesystem and a real S3 server."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest
import webdataset as wds
from webdataset.tariterators import group_by_keys, tar_file_expander

from pipeline.formats import wds as codec
from pipeline.formats.wds import Sample, ShardReadError
from pipeline.store import storage
from tests.pipeline.tarsamples import as_dicts, random_samples, strip_meta


def _wds_tar(samples: list[Sample]) -> bytes:
    """A shard written by webdataset's own TarWriter."""
    buf = io.BytesIO()
    with wds.TarWriter(buf) as w:
        for s in samples:
            w.write({"__key__": s.key, **dict(s.members)})
    return buf.getvalue()


def test_split_member_name_and_pick_image() -> None:
    assert codec.split_member_name("a/b.c/k1.seg.png") == ("a/b.c/k1", "seg.png")
    assert codec.split_member_name("k.jpg") == ("k", "jpg")
    assert codec.split_member_name("noext") is None
    assert codec.split_member_name("d/.hidden") is None
    assert codec.pick_image_member([("json", b""), ("seg.png", b""), ("jpg", b"")]) == "jpg"
    assert codec.pick_image_member(["json", "left.PNG"]) == "left.PNG"
    assert codec.pick_image_member(["json", "txt"]) is None


def test_iter_tar_samples_reads_wds_shards(root: str) -> None:
    samples = random_samples(7)
    uri = storage.join(root, "in/shard-000.tar")
    storage.write_bytes_atomic(uri, _wds_tar(samples))
    assert list(codec.iter_tar_samples(uri)) == samples


def test_truncated_tar_yields_samples_before_the_cut(root: str) -> None:
    samples = random_samples(6)
    data = _wds_tar(samples)
    offsets = [m.offset for m in tarfile.open(fileobj=io.BytesIO(data)) if m.name.startswith("dir.v1/000004.")]
    # Cut inside the data of sample 4's second member: samples 0..3 are whole, sample 4 is partial.
    cut_uri = storage.join(root, "cut-in-data.tar")
    storage.write_bytes_atomic(cut_uri, data[: offsets[1] + 512 + 10])
    got: list[Sample] = []
    with pytest.raises(ShardReadError, match="after 4 complete samples") as info:
        for s in codec.iter_tar_samples(cut_uri):
            got.append(s)
    assert got == samples[:4]
    assert info.value.samples_read == 4
    assert info.value.partial is not None and info.value.partial.members == samples[4].members[:1]

    # Cut exactly at a member boundary: tarfile sees a clean end, the missing end marker tells.
    boundary_uri = storage.join(root, "cut-at-boundary.tar")
    storage.write_bytes_atomic(boundary_uri, data[: offsets[0]])
    got = []
    with pytest.raises(ShardReadError, match="no end-of-archive marker"):
        for s in codec.iter_tar_samples(boundary_uri):
            got.append(s)
    assert got == samples[:3]
    assert list(codec.iter_tar_samples(boundary_uri, require_end_marker=False)) == samples[:4]

    garbage = storage.join(root, "garbage.tar")
    storage.write_bytes_atomic(garbage, b"not a tar at all" * 100)
    with pytest.raises(ShardReadError):
        list(codec.iter_tar_samples(garbage))


def test_encode_tar_part_is_deterministic_and_concatenates() -> None:
    samples = random_samples(5)
    a, b = codec.encode_tar_part(samples[:2]), codec.encode_tar_part(samples[2:])
    assert a == codec.encode_tar_part(samples[:2])
    assert len(a) % 512 == 0 and not a.endswith(b"\0" * 1024)
    whole = a + b + codec.END_OF_ARCHIVE
    members = list(tarfile.open(fileobj=io.BytesIO(whole)))
    assert [m.name for m in members] == [f"{s.key}.{sfx}" for s in samples for sfx, _ in s.members]
    assert {(m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode) for m in members} == {(0, 0, 0, "", "", 0o444)}
    assert [strip_meta(d) for d in group_by_keys(tar_file_expander([{"url": "x", "stream": io.BytesIO(whole)}]))] == (
        as_dicts(samples)
    )


def test_empty_and_zero_byte_shards(tmp_path: Path) -> None:
    (tmp_path / "empty.tar").write_bytes(codec.tar_trailer(0))
    assert list(codec.iter_tar_samples(str(tmp_path / "empty.tar"))) == []
    (tmp_path / "zero.tar").write_bytes(b"")  # a zero-byte file is not a tar
    with pytest.raises(ShardReadError, match="empty file"):
        list(codec.iter_tar_samples(str(tmp_path / "zero.tar")))


# --------------------------------------------------------------------------------------------- hostile archives


def _member(tf: tarfile.TarFile, name: str, data: bytes = b"", kind: bytes = tarfile.REGTYPE, link: str = "") -> None:
    """Add one member as a hostile tool would write it: any name, any type, links never resolved."""
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, link
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    tf.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)


def _read(path: Path) -> tuple[list[Sample], list[codec.MemberNote]]:
    unit_notes: list[codec.MemberNote] = []
    samples = list(codec.iter_tar_samples(str(path), on_note=unit_notes.append))
    return samples, unit_notes


def _notes(sample: Sample) -> list[tuple[str, str]]:
    return [(n.name, n.reason) for n in sample.notes]


@pytest.mark.parametrize("fmt", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT, tarfile.USTAR_FORMAT])
def test_links_devices_and_dirs_are_noted_never_followed(tmp_path: Path, fmt: int) -> None:
    secret = tmp_path / "secret.jpg"
    secret.write_bytes(b"must never be read")
    path = tmp_path / "links.tar"
    with tarfile.open(path, "w", format=fmt) as tf:
        _member(tf, "d.v1", kind=tarfile.DIRTYPE)  # a dotted directory: no sample "d"
        _member(tf, "d.v1/a.jpg", b"A")
        _member(tf, "d.v1/a.txt", kind=tarfile.SYMTYPE, link=str(secret))
        _member(tf, "onlylinks.jpg", kind=tarfile.SYMTYPE, link="../../etc/passwd")
        _member(tf, "onlylinks.png", kind=tarfile.LNKTYPE, link="d.v1/a.jpg")
        _member(tf, "fifo.jpg", kind=tarfile.FIFOTYPE)
        _member(tf, "dev.jpg", kind=tarfile.CHRTYPE)
        _member(tf, "dev.json", b"{}")
        _member(tf, "blk.jpg", kind=tarfile.BLKTYPE)
        _member(tf, "z.jpg", b"Z")
    samples, unit_notes = _read(path)
    assert [(s.key, s.members) for s in samples] == [
        ("d.v1/a", [("jpg", b"A")]), ("onlylinks", []), ("fifo", []), ("dev", [("json", b"{}")]), ("blk", []),
        ("z", [("jpg", b"Z")]),
    ]
    assert _notes(samples[0]) == [("d.v1/a.txt", f"symbolic link to {str(secret)!r}, not followed")]
    assert _notes(samples[1]) == [("onlylinks.jpg", "symbolic link to '../../etc/passwd', not followed"),
                                  ("onlylinks.png", "hard link to 'd.v1/a.jpg', not followed")]
    assert _notes(samples[2]) == [("fifo.jpg", "fifo entry")]
    assert _notes(samples[3]) == [("dev.jpg", "character device entry")]
    assert _notes(samples[4]) == [("blk.jpg", "block device entry")]
    assert samples[5].notes == []
    assert [(n.name, n.reason) for n in unit_notes] == [("d.v1", "directory entry")]


def test_unsafe_keys_drop_the_sample_and_report_every_member(tmp_path: Path) -> None:
    path = tmp_path / "unsafe.tar"
    long_escape = "../" * 40 + "x.jpg"  # over 100 bytes: a pax/GNU long-name header carries it
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tf:
        _member(tf, "ok1.jpg", b"1")
        _member(tf, "../x.jpg", b"up")
        _member(tf, "../x.json", b"{}")
        _member(tf, "/etc/x.jpg", b"abs")
        _member(tf, "a/../../x.jpg", b"up2")
        _member(tf, "a/../x.jpg", b"alias")  # stays inside, but would extract over x.jpg
        _member(tf, long_escape, b"long")
        _member(tf, "win\\..\\x.jpg", b"bs")
        _member(tf, "ok2.jpg", b"2")
        _member(tf, "ok2.a\\b", b"bs suffix")  # the key is fine, the suffix is not
        _member(tf, "ok1.txt", b"again")  # ok1 again, not adjacent: would write ok1.* twice
    samples, unit_notes = _read(path)
    assert [(s.key, s.members) for s in samples] == [("ok1", [("jpg", b"1")]), ("ok2", [("jpg", b"2")])]
    assert _notes(samples[1]) == [("ok2.a\\b", "backslash in name (a path separator on Windows)")]
    dotdot = "unsafe sample key: '..' component in path"
    assert [(n.name, n.reason) for n in unit_notes] == [
        ("../x.jpg", dotdot), ("../x.json", dotdot), ("/etc/x.jpg", "unsafe sample key: absolute path"),
        ("a/../../x.jpg", dotdot), ("a/../x.jpg", dotdot), (long_escape, dotdot),
        ("win\\..\\x.jpg", "unsafe sample key: backslash in name (a path separator on Windows)"),
        ("ok1.txt", "sample key repeated: an earlier, non-adjacent sample of this shard has it"),
    ]


def test_non_utf8_names_are_reported_escaped(tmp_path: Path) -> None:
    # GNU tar on a latin-1 system writes the names' raw bytes; reading them must not fail the shard.
    path = tmp_path / "latin1.tar"
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT, encoding="latin-1") as tf:
        _member(tf, "café.jpg", b"c")
        _member(tf, "café.txt", b"t")
        _member(tf, "k.jpg", b"k")
        _member(tf, "k.légende", b"l")
        _member(tf, "ünï.jpg", b"u")
    raw_names = [m.name for m in tarfile.open(path, encoding="utf-8", errors="surrogateescape")]
    assert raw_names[0].encode("utf-8", "surrogateescape") == b"caf\xe9.jpg"  # really not UTF-8 on disk
    samples, unit_notes = _read(path)
    assert [(s.key, s.members) for s in samples] == [("k", [("jpg", b"k")])]
    assert _notes(samples[0]) == [("k.l\\xe9gende", "name is not valid UTF-8")]
    bad_key = "unsafe sample key: name is not valid UTF-8"
    assert [(n.name, n.reason) for n in unit_notes] == [
        ("caf\\xe9.jpg", bad_key), ("caf\\xe9.txt", bad_key), ("\\xfcn\\xef.jpg", bad_key)]
    for note in unit_notes + samples[0].notes:
        note.name.encode("utf-8")  # valid UTF-8: Arrow and JSON carry it
        assert note.name.isprintable()


def test_duplicates_no_suffix_and_meta_names(tmp_path: Path) -> None:
    path = tmp_path / "names.tar"
    with tarfile.open(path, "w") as tf:
        _member(tf, "__key__", b"meta")
        _member(tf, "README", b"top-level file, no suffix")
        _member(tf, "s1.jpg", b"first")
        _member(tf, "s1.jpg", b"second copy")
        _member(tf, "s1", b"the key itself")
        _member(tf, "s1.", b"empty suffix")
        _member(tf, "s1.__key__", b"would replace the key")
        _member(tf, "s1.json", b"{}")
        _member(tf, "dir/.hidden", b"dotfile")
        _member(tf, "s2.seg.png", b"p")
        _member(tf, "s2.JPG", b"upper")
        _member(tf, "s2.jpg", b"lower")  # another name, byte-wise: both are carried
        _member(tf, "./s3 with space.jpg", b"sp")
    samples, unit_notes = _read(path)
    assert [(s.key, s.members) for s in samples] == [
        ("s1", [("jpg", b"first"), ("json", b"{}")]),
        ("s2", [("seg.png", b"p"), ("JPG", b"upper"), ("jpg", b"lower")]),
        ("./s3 with space", [("jpg", b"sp")]),
    ]
    assert _notes(samples[0]) == [
        ("s1.jpg", "repeated member name in the sample (the first copy is kept)"), ("s1", "no suffix"),
        ("s1.", "no suffix after the key's dot"),
        ("s1.__key__", "WebDataset meta name as suffix (it would overwrite the sample's own fields)"),
    ]
    assert [(n.name, n.reason) for n in unit_notes] == [
        ("__key__", "WebDataset meta name"), ("README", "no suffix: not a sample member"),
        ("dir/.hidden", "no suffix: not a sample member"),
    ]


def test_notes_survive_a_truncated_shard(tmp_path: Path) -> None:
    path = tmp_path / "cut.tar"
    with tarfile.open(path, "w") as tf:
        _member(tf, "a.jpg", b"a" * 600)
        _member(tf, "b.jpg", kind=tarfile.SYMTYPE, link="a.jpg")
        _member(tf, "b.png", b"b" * 3000)
    data = path.read_bytes()
    path.write_bytes(data[: data.index(b"b" * 100) + 1000])
    got: list[Sample] = []
    with pytest.raises(ShardReadError, match="after 1 complete samples") as info:
        got.extend(codec.iter_tar_samples(str(path)))
    assert [s.key for s in got] == ["a"]
    partial = info.value.partial
    assert partial is not None and partial.key == "b" and partial.members == []
    assert _notes(partial) == [("b.jpg", "symbolic link to 'a.jpg', not followed")]


def test_unit_notes_without_a_callback_are_logged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "abs.tar"
    with tarfile.open(path, "w") as tf:
        _member(tf, "/etc/passwd.jpg", b"x")
    assert list(codec.iter_tar_samples(str(path))) == []
    assert "'/etc/passwd.jpg' not carried: unsafe sample key: absolute path" in caplog.text


@pytest.mark.parametrize(("key", "suffix", "why"), [
    ("../x", "jpg", "'..' component"), ("/etc/x", "jpg", "absolute path"), ("a/../../x", "jpg", "'..' component"),
    ("a/../x", "jpg", "'..' component"), ("k", "a\\b", "backslash"), ("k\0", "jpg", "NUL"),
    ("caf\udce9", "jpg", "not valid UTF-8"), ("a.b", "jpg", "would not read back"),
    ("d/.k", "jpg", "would not read back"),
])
def test_encode_tar_part_refuses_unsafe_names(key: str, suffix: str, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        codec.encode_tar_part([Sample(key="fine", members=[("jpg", b"1")]), Sample(key=key, members=[(suffix, b"2")])])


def test_hostile_shard_round_trips_into_a_safe_output(tmp_path: Path) -> None:
    """What the reader yields, the writer accepts, and the result extracts with tarfile's data filter inside the
    destination, holding only regular files."""
    path = tmp_path / "mixed.tar"
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tf:
        _member(tf, "a.jpg", b"a")
        _member(tf, "a.lnk", kind=tarfile.SYMTYPE, link="/etc/passwd")
        _member(tf, "../up.jpg", b"u")
        _member(tf, "ünï/ké y.jpg", b"k")
        _member(tf, "l.jpg", kind=tarfile.LNKTYPE, link="a.jpg")
    samples, _ = _read(path)
    out = tmp_path / "out.tar"
    body = codec.encode_tar_part(samples)
    out.write_bytes(body + codec.tar_trailer(len(body)))
    dest = tmp_path / "x" / "dest"
    dest.mkdir(parents=True)
    with tarfile.open(out) as tf:
        assert all(m.isreg() for m in tf.getmembers())
        tf.extractall(dest, filter="data")
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file()) == [
        "mixed.tar", "out.tar", "x/dest/a.jpg", "x/dest/ünï/ké y.jpg"]


def test_a_link_does_not_shadow_a_later_regular_copy(tmp_path: Path) -> None:
    path = tmp_path / "shadow.tar"
    with tarfile.open(path, "w") as tf:
        _member(tf, "k.jpg", kind=tarfile.SYMTYPE, link="/etc/shadow")
        _member(tf, "k.jpg", b"the real image")
        _member(tf, "k.jpg", b"a third copy")
    samples, unit_notes = _read(path)
    assert [(s.key, s.members) for s in samples] == [("k", [("jpg", b"the real image")])]
    assert _notes(samples[0]) == [("k.jpg", "symbolic link to '/etc/shadow', not followed"),
                                  ("k.jpg", "repeated member name in the sample (the first copy is kept)")]
    assert unit_notes == []
