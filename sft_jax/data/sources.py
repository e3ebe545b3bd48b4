"""Row sources: random access to the rows of one ``data.path`` entry, without loading it whole.

A source has ``len(source)``, ``source.row(i) -> (row dict, "file:line")`` and
``source.block_starts`` (the first row of each contiguous block that is cheap to read
together; the streaming shuffle permutes blocks and shuffles rows within a window of
them).  Kinds, chosen from the entry:

- ``*.jsonl`` (and ``.jsonl.gz`` / ``.jsonl.zst``): a byte-offset index of the lines
  (16 bytes per row in memory); a row is one positional read.  Compressed files are first
  decompressed, streaming, to a temporary file (deleted at exit).
- ``*.json`` (an array or one object): parsed whole (JSON arrays cannot be indexed).
- ``*.parquet`` (a directory of shards gives one source per file): the footer only; a row reads its
  row group, and the last few decoded row groups (Arrow tables) are cached per process;
  ``line`` = 1-based row in the file.  Store nested values whose keys vary from row to row
  (tool-call ``arguments``, ``tools``) as JSON text: a struct column fills absent keys with null.
- ``*.arrow`` / a ``datasets.save_to_disk`` directory (``dir`` or ``dir@split`` for a
  DatasetDict) / ``hf:org/name[:config][@split]``: a memory-mapped ``datasets.Dataset``
  (the hub id is downloaded into the ``datasets`` cache first; needs a network).

Every reader names the file and the line (row) of bad input in a :class:`DataError`.
"""

from __future__ import annotations

import array
import atexit
import bisect
import collections
import gzip
import json
import logging
import os
import pathlib
import shutil
import tempfile
import threading
import zlib

import numpy as np
import pyarrow.parquet as pq
import zstandard

from sft_jax.data.errors import DataError

log = logging.getLogger(__name__)

JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst")
JSON_SUFFIXES = (".json", ".json.gz", ".json.zst")
COLUMNAR_SUFFIXES = (".parquet", ".arrow")
FILE_SUFFIXES = JSONL_SUFFIXES + JSON_SUFFIXES + COLUMNAR_SUFFIXES
HF_PREFIX = "hf:"
CHUNK_ROWS = 1024  # block size of sources without natural blocks (JSONL, Arrow)
# Decoded Parquet row groups kept per process (worker), shared by every ParquetSource: the
# streaming shuffle reads a window of blocks at a time, so the pipeline sets this to the window.
_ROW_GROUPS: collections.OrderedDict = collections.OrderedDict()
_ROW_GROUPS_LOCK = threading.Lock()  # grain reads with several threads; a ParquetFile is not thread-safe


def suffix_of(path: str) -> str:
    """The data suffix of ``path`` ("" when it is not a data file)."""
    name = str(path).lower()
    for s in sorted(FILE_SUFFIXES, key=len, reverse=True):
        if name.endswith(s):
            return s
    return ""


def is_saved_dataset(path: pathlib.Path) -> bool:
    """A ``datasets.save_to_disk`` directory (a Dataset or a DatasetDict)."""
    return path.is_dir() and any((path / n).is_file() for n in ("state.json", "dataset_dict.json"))


def open_compressed(path: str):
    """A binary reader of ``path``, decompressing ``.gz`` / ``.zst`` (any case) on the fly."""
    if str(path).lower().endswith(".gz"):
        return gzip.open(path, "rb")
    if str(path).lower().endswith(".zst"):
        return zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True)
    return open(path, "rb")


def read_bytes(path: str) -> bytes:
    """The whole (decompressed) content of ``path``."""
    try:
        with open_compressed(path) as f:
            return f.read()
    except (OSError, EOFError, zlib.error, zstandard.ZstdError) as e:
        raise DataError(f"{path}: cannot decompress: {e}") from None


# ------------------------------------------------------------------------------- JSONL

_TMP_DIRS: list[str] = []


@atexit.register
def _remove_tmp_dirs() -> None:
    for d in _TMP_DIRS:
        shutil.rmtree(d, ignore_errors=True)


def _decompress_to_tmp(path: str) -> str:
    d = tempfile.mkdtemp(prefix="sft_jax_stream_")
    _TMP_DIRS.append(d)
    out = os.path.join(d, os.path.basename(path).rsplit(".", 1)[0])
    try:
        with open_compressed(path) as src, open(out, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 22)
    except (OSError, EOFError, zlib.error, zstandard.ZstdError) as e:
        raise DataError(f"{path}: cannot decompress: {e}") from None
    return out


def _read_line(fd: int, offset: int) -> bytes:
    """The line starting at ``offset`` (positional reads: safe under grain's reader threads)."""
    out = b""
    while True:
        chunk = os.pread(fd, 1 << 16, offset + len(out))
        k = chunk.find(b"\n")
        if k >= 0 or not chunk:
            return out + (chunk[:k] if k >= 0 else chunk)
        out += chunk


class JsonlSource:
    """Lines of a JSONL file by byte offset (blank lines are not rows)."""

    def __init__(self, path: str):
        self.path = path
        self._file = _decompress_to_tmp(path) if path.lower().endswith((".gz", ".zst")) else path
        offsets, lines = array.array("q"), array.array("q")  # 8 bytes a row while indexing, too
        pos, lineno = 0, 0
        with open(self._file, "rb") as f:
            for raw in f:
                lineno += 1
                body = raw[3:] if lineno == 1 and raw.startswith(b"\xef\xbb\xbf") else raw  # a leading BOM
                if body.strip(b" \t\r\n"):  # JSON whitespace only (as formats' in-memory reader)
                    offsets.append(pos)
                    lines.append(lineno)
                pos += len(raw)
        if not offsets:
            raise DataError(f"{path}: empty file (no rows)")
        self._offsets = np.frombuffer(offsets, np.int64)
        self._lines = np.frombuffer(lines, np.int64)
        self.block_starts = np.arange(0, len(offsets), CHUNK_ROWS, dtype=np.int64)
        self._fd = None

    def __len__(self) -> int:
        return len(self._offsets)

    def __getstate__(self):
        return {**self.__dict__, "_fd": None}

    def row(self, i: int) -> tuple[dict, str]:
        if self._fd is None:
            self._fd = os.open(self._file, os.O_RDONLY)
        raw = _read_line(self._fd, int(self._offsets[i]))
        where = f"{self.path}:{int(self._lines[i])}"
        try:
            text = raw.decode("utf-8-sig" if self._offsets[i] == 0 else "utf-8")  # a BOM only starts the file
        except UnicodeDecodeError as e:
            raise DataError(f"{where}: invalid UTF-8 (byte {raw[e.start]:#04x} at column {e.start + 1})") from None
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: malformed JSON line: {e.msg} (column {e.colno})") from None
        except (ValueError, RecursionError) as e:  # an over-long integer, nesting too deep
            raise DataError(f"{where}: malformed JSON line: {type(e).__name__}: {e}") from None
        if not isinstance(obj, dict):
            raise DataError(f"{where}: a row must be a JSON object, got {type(obj).__name__}")
        return obj, where


class ListSource:
    """Rows already in memory (a JSON file, which cannot be indexed without parsing it)."""

    def __init__(self, path: str, rows: list[tuple[dict, int]]):
        self.path = path
        self._rows = rows
        self.block_starts = np.arange(0, len(rows), CHUNK_ROWS, dtype=np.int64)

    def __len__(self) -> int:
        return len(self._rows)

    def row(self, i: int) -> tuple[dict, str]:
        obj, line = self._rows[i]
        return obj, f"{self.path}:{line}"


# ----------------------------------------------------------------------------- Parquet


class ParquetSource:
    """Rows of one Parquet file, one row group decoded at a time (the last few LRU-cached)."""

    def __init__(self, path: str, cache_blocks: int = 4):
        self.path = path
        self.cache_blocks = cache_blocks
        try:
            meta = pq.ParquetFile(path).metadata
        except Exception as e:  # pyarrow raises ArrowInvalid / OSError on a bad footer
            raise DataError(f"{path}: not a readable Parquet file: {e}") from None
        sizes = [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]
        self._groups = [g for g, n in enumerate(sizes) if n]  # row groups that hold rows
        if not self._groups:
            raise DataError(f"{path}: empty file (no rows)")
        counts = [sizes[g] for g in self._groups]
        self.block_starts = np.cumsum([0] + counts[:-1]).astype(np.int64)
        self._len = int(sum(counts))
        self._file = None

    def __len__(self) -> int:
        return self._len

    def __getstate__(self):
        return {**self.__dict__, "_file": None}

    def _block(self, b: int):
        """Row group ``b`` as an Arrow table (columnar: about the size of the raw data)."""
        key = (self.path, b)
        with _ROW_GROUPS_LOCK:
            if key in _ROW_GROUPS:
                _ROW_GROUPS.move_to_end(key)
                return _ROW_GROUPS[key]
            if self._file is None:
                self._file = pq.ParquetFile(self.path)
            table = self._file.read_row_group(self._groups[b])
            _ROW_GROUPS[key] = table
            while len(_ROW_GROUPS) > self.cache_blocks:
                _ROW_GROUPS.popitem(last=False)
            return table

    def row(self, i: int) -> tuple[dict, str]:
        b = bisect.bisect_right(self.block_starts, i) - 1
        return self._block(b).slice(i - int(self.block_starts[b]), 1).to_pylist()[0], f"{self.path}:{i + 1}"


# ------------------------------------------------------------------------ Arrow / hub


class DatasetSource:
    """A memory-mapped ``datasets.Dataset`` (an ``.arrow`` file, a saved dataset, a hub id)."""

    def __init__(self, dataset, path: str):
        self.path = path
        self._ds = dataset
        self.block_starts = np.arange(0, len(dataset), CHUNK_ROWS, dtype=np.int64)
        if len(dataset) == 0:
            raise DataError(f"{path}: no rows")

    def __len__(self) -> int:
        return len(self._ds)

    def row(self, i: int) -> tuple[dict, str]:
        return self._ds[int(i)], f"{self.path}:{int(i) + 1}"


def _pick_split(obj, path: str, split: str):
    import datasets

    if isinstance(obj, datasets.DatasetDict):
        split = split or ("train" if "train" in obj else "")
        if split not in obj:
            raise DataError(f"{path}: a DatasetDict with splits {sorted(obj)}; name one as {path}@SPLIT")
        return obj[split]
    if split:
        raise DataError(f"{path}: a single Dataset has no split {split!r}")
    return obj


def parse_hf_id(entry: str) -> tuple[str, str | None, str]:
    """``hf:org/name[:config][@split]`` -> ``(name, config or None, split)`` (split default "train")."""
    spec = entry[len(HF_PREFIX):]
    spec, _, split = spec.partition("@")
    name, _, config = spec.partition(":")
    if not name or name.count("/") > 1:
        raise DataError(f"data.path entry {entry!r}: expected hf:org/name[:config][@split]")
    return name, config or None, split or "train"


def open_hf(entry: str) -> DatasetSource:
    """A hub dataset through ``datasets.load_dataset`` (downloaded to its cache; no remote code)."""
    import datasets

    name, config, split = parse_hf_id(entry)
    try:
        ds = datasets.load_dataset(name, config, split=split)
    except Exception as e:  # network, missing dataset, bad config: name the entry
        raise DataError(f"data.path entry {entry!r}: datasets.load_dataset failed: {e}") from None
    return DatasetSource(ds, entry)


def open_saved(path: str) -> DatasetSource:
    """``dir`` / ``dir@split`` (``datasets.save_to_disk``) or an ``.arrow`` file."""
    import datasets

    base, _, split = path.partition("@") if not os.path.exists(path) else (path, "", "")
    if base.lower().endswith(".arrow") and os.path.isfile(base):
        try:
            return DatasetSource(datasets.Dataset.from_file(base), base)
        except Exception as e:
            raise DataError(f"{base}: not a readable Arrow file: {e}") from None
    if not is_saved_dataset(pathlib.Path(base)):
        raise DataError(f"{base}: not a datasets.save_to_disk directory (no state.json / dataset_dict.json)")
    return DatasetSource(_pick_split(datasets.load_from_disk(base), base, split), path)


# ---------------------------------------------------------------------------- entries


def list_dir(p: pathlib.Path) -> tuple[list[str], list[str]]:
    """``(data files, ignored entries)`` of a data directory, in name order (suffixes in any case;
    subdirectories and other files are ignored, and named)."""
    found, ignored = [], []
    for f in sorted(p.iterdir()):
        (found if f.is_file() and suffix_of(f.name) else ignored).append(str(f) + ("/" if f.is_dir() else ""))
    return found, ignored


def _names(paths: list[str], limit: int = 8) -> str:
    names = [os.path.basename(x.rstrip("/")) + ("/" if x.endswith("/") else "") for x in paths]
    return ", ".join(names[:limit]) + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def ignored_files(spec: str) -> list[str]:
    """The entries that the directories named in ``data.path`` hold but that are not read."""
    out = []
    for part in [x.strip() for x in spec.split(",") if x.strip()]:
        p = pathlib.Path(part).expanduser()
        if not part.startswith(HF_PREFIX) and p.is_dir() and not is_saved_dataset(p):
            out.extend(list_dir(p)[1])
    return out


def expand_entry(entry: str) -> list[str]:
    """One ``data.path`` entry -> the sources it names (files, saved datasets, hub ids).

    A directory gives every data file inside (name order: the shards of a Parquet set)."""
    if entry.startswith(HF_PREFIX):
        return [entry]
    p = pathlib.Path(entry).expanduser()
    if is_saved_dataset(p) or (not p.exists() and "@" in entry and is_saved_dataset(pathlib.Path(entry.split("@")[0]))):
        return [str(p) if p.exists() else entry]
    if p.is_dir():
        found, ignored = list_dir(p)
        if not found:
            raise DataError(f"{p}: directory holds no data files ({', '.join(FILE_SUFFIXES)}, any case)"
                            + (f"; it has {_names(ignored)}" if ignored else ""))
        if ignored:
            log.warning("data.path %s: ignoring %d %s (data files end in %s, any case): %s", p, len(ignored),
                        "entry" if len(ignored) == 1 else "entries", ", ".join(FILE_SUFFIXES), _names(ignored))
        return found
    if p.is_file():
        return [str(p)]
    raise DataError(f"{p}: no such file or directory")


def _starts_with_array(path: str) -> bool:
    """A ``.jsonl`` that is really one JSON array (parsed whole, like a ``.json``)."""
    try:
        with open_compressed(path) as f:
            head = f.read(4096)
    except (OSError, EOFError, zlib.error, zstandard.ZstdError) as e:
        raise DataError(f"{path}: cannot read: {e}") from None
    return head.lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"[")


def open_source(entry: str, read_json=None, *, cache_blocks: int = 4):
    """The row source of one expanded entry (see :func:`expand_entry`).

    ``read_json(path)`` -> ``[(row, line)]`` parses a whole ``.json`` file (formats.read_rows);
    ``cache_blocks``: decoded Parquet row groups kept per process."""
    if entry.startswith(HF_PREFIX):
        return open_hf(entry)
    s = suffix_of(entry)
    if s in JSONL_SUFFIXES and not _starts_with_array(entry):
        return JsonlSource(entry)
    if s in JSONL_SUFFIXES:
        return ListSource(entry, read_json(entry))
    if s in JSON_SUFFIXES:
        return ListSource(entry, read_json(entry))
    if s == ".parquet":
        return ParquetSource(entry, cache_blocks)
    return open_saved(entry)


__all__ = [
    "FILE_SUFFIXES", "HF_PREFIX", "JsonlSource", "ListSource", "ParquetSource", "DatasetSource",
    "expand_entry", "open_source", "open_hf", "open_saved", "parse_hf_id", "read_bytes",
    "suffix_of", "is_saved_dataset", "list_dir", "ignored_files",
]
