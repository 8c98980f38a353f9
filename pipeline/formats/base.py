"""The contract every archive format implements (STYLE rule 15): list units, read rows, encode parts, assemble.

A format is one class behind this interface; the stages, the commit and the run loop ask a unit's format
(:attr:`pipeline.formats.units.Unit.format`) and never which format they hold. Adding a format is adding a file here and
a line in :data:`pipeline.formats.FORMATS`. What a format decides:

* **planning**: which inputs of SRC are its units (:meth:`Format.list_units`), and anything DST must record before
  the run starts (:meth:`Format.prepare_dst`, e.g. the image folders' chunk layout);
* **names**: where a unit's output and its commit marker live (:meth:`Format.output_uri`, :meth:`Format.marker_uri`);
  staging names are the same for every format (:meth:`pipeline.formats.units.Unit.staging_uri`);
* **reading**: the unit's samples as :class:`ReadRow` s, in output order (:meth:`Format.read`); the stages pack
  them into bounded blocks;
* **parts**: a block's finished rows as the bytes of one staged part (:meth:`Format.encode_part`), deterministic
  for the same rows, so that a retried block rewrites the same part;
* **commit**: the covering parts streamed, in order, into the one output file (:meth:`Format.assemble`), never
  the whole unit in memory; :func:`pipeline.formats.shards.commit` wraps it with the atomic write, the checksum and the
  marker, which is the same for every format;
* **checking**: how many samples a committed output holds (:meth:`Format.count_output`, ``dr2 check-output``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Generator, Sequence
from dataclasses import dataclass, field
from typing import IO, TYPE_CHECKING, Any, ClassVar

from pipeline import failpoints
from pipeline.store import storage
from pipeline.store.storage import StorageOptions

if TYPE_CHECKING:
    import pyarrow as pa

    from pipeline.config import PipelineConfig
    from pipeline.formats.units import Unit, UnitKind
    from pipeline.formats.wds import MemberNote

COPY_CHUNK = 8 * storage.MiB


@dataclass
class ReadRow:
    """One sample as a format reads it; the stages add the unit's name and the sample's index.

    ``image`` holds the image's bytes once (``members`` keep an empty slot for it, tars only); ``status`` is
    ``pending`` for a sample to process, else the final status of a sample that cannot be (``no_image``,
    ``truncated``) with its ``error``."""

    key: str
    image_member: str | None
    image: bytes | None
    status: str
    error: str = ""
    members: Sequence[tuple[str, bytes]] = ()
    notes: Sequence[MemberNote] = ()


ReadResult = Generator[ReadRow, None, str]
"""What :meth:`Format.read` returns: the rows, then (as the generator's return value) why reading stopped early,
or ``""`` when the unit was read to its end."""


@dataclass
class PartRows:
    """A run of consecutive rows of one unit in a finished block, what :meth:`Format.encode_part` encodes.

    ``run`` are row positions in ``table`` (consecutive indexes of the unit), ``output`` the composed image bytes per
    block row (None: the input passes through), ``metas`` the ``dr2.json`` document of each row of ``run``, and
    ``skip`` the statuses left out of the outputs (``--skip-status``)."""

    table: pa.Table
    run: list[int]
    output: list[bytes | None]
    metas: list[dict[str, Any]]
    skip: frozenset[str] = field(default_factory=frozenset)

    def kept(self) -> list[tuple[int, dict[str, Any]]]:
        """(row, metadata) of the rows written to the output: all but those of a skipped status."""
        return [(r, m) for r, m in zip(self.run, self.metas, strict=True) if m["status"] not in self.skip]


class OutputSink:
    """The committed output as a format writes it: counts its bytes and hashes them on the way to ``out`` (an
    :class:`~pipeline.store.storage.AtomicWriter` file). ``close`` does nothing: the atomic writer publishes the object,
    whatever a library writing into the sink (pyarrow's ParquetWriter) does at its end."""

    def __init__(self, out: IO[bytes]) -> None:
        import hashlib

        self._out = out
        self.digest = hashlib.sha256()
        self.size = 0
        self.closed = False

    def write(self, data: bytes | bytearray | memoryview) -> int:
        self._out.write(data)
        self.digest.update(data)
        n = len(memoryview(data).cast("B"))
        self.size += n
        return n

    def tell(self) -> int:
        return self.size

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass

    def writable(self) -> bool:
        return True


def copy_parts(parts: Sequence[str], out: OutputSink, options: StorageOptions | None) -> None:
    """Concatenate the staged parts into ``out``, 8 MiB at a time: the assembly of byte-concatenable formats."""
    for uri in parts:
        with storage.open_read(uri, options=options) as f:
            while chunk := f.read(COPY_CHUNK):
                out.write(chunk)
                failpoints.hit("commit.mid_output")


class Format(ABC):
    """One archive format: see the module docstring for what each method owns."""

    kind: ClassVar[UnitKind]
    output_suffixes: ClassVar[tuple[str, ...]] = ()
    """Suffixes of output files that DST holds beside their markers (``dr2 check-output`` lists those without)."""

    # --- planning ---

    @abstractmethod
    def list_units(self, cfg: PipelineConfig) -> list[Unit]:
        """The units of SRC in this format, in a stable order; empty when SRC holds none."""

    def prepare_dst(self, cfg: PipelineConfig, units: Sequence[Unit]) -> None:  # noqa: B027 - optional hook
        """Anything DST must record before a run over ``units`` starts (nothing, for most formats)."""

    # --- names ---

    @abstractmethod
    def output_uri(self, unit: Unit, dst: str) -> str:
        """The unit's committed output."""

    @abstractmethod
    def marker_uri(self, unit: Unit, dst: str) -> str:
        """The unit's ``.stats.json`` commit marker, written LAST."""

    def size_hint(self, unit: Unit) -> tuple[int | None, int | None]:
        """(input bytes, rows) as far as planning knows them, from the listed ``size:version`` identity."""
        size, sep, _ = unit.input.partition(":")
        return (int(size), None) if sep and size.isdigit() else (None, None)

    def marker_fields(self, unit: Unit) -> dict[str, Any]:
        """What the unit's marker records of the unit beyond the common stats."""
        return {}

    # --- reading and parts ---

    @abstractmethod
    def read(self, unit: Unit, cfg: PipelineConfig, unit_notes: list[MemberNote]) -> ReadResult:
        """The unit's samples in output order (see :data:`ReadResult`); ``unit_notes`` collects what is not carried
        and belongs to no sample. Storage that fails raises (the stages record the unit as unreadable)."""

    @abstractmethod
    def encode_part(self, unit: Unit, dst: str, rows: PartRows, options: StorageOptions) -> bytes:
        """The bytes of the part that stages ``rows``: the same bytes for the same rows."""

    # --- commit and check ---

    @abstractmethod
    def assemble(self, unit: Unit, parts: Sequence[str], expected: int, out: OutputSink,
                 options: StorageOptions | None) -> None:
        """Write the unit's output from its covering ``parts`` (in index order) into ``out``, streaming."""

    @abstractmethod
    def count_output(self, uri: str, options: StorageOptions | None) -> int:
        """How many samples a committed output holds (raises when it cannot be read)."""
