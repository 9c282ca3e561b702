"""A data file's rows, whatever holds them: a local ``.jsonl``, ``.json``, ``.csv`` or ``.parquet``
file, a directory written by ``datasets``' ``save_to_disk``, the same on a storage URI
(``s3://``, ``gs://``, ``file://``: fsspec, as ``datasets`` reads them), or a dataset on the
Hugging Face hub (``hf://datasets/ORG/NAME``, at ``data.revision``, split ``data.hf_split``).

Every one reads the same way (:meth:`DataFile.rows`): ``(row number, row)`` pairs, streamed, a
row a mapping of column name to value; and has a content digest (:meth:`DataFile.digest`) that
keys the tokenization cache. JSONL and CSV are read line by line here, so an error names the line;
JSON, parquet, ``save_to_disk`` directories and hub datasets through ``datasets`` (streamed, or
its memory-mapped arrow cache). No torch; ``datasets`` and ``fsspec`` are imported when used.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import io
import json
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import unquote, urlparse

from lora_dist import safejson
from lora_dist.confine import confine, under
from lora_dist.errors import JobError
from lora_dist.store import is_uri, sha256_file

FORMATS = ("jsonl", "json", "csv", "parquet")
HEADER_NAME = re.compile(r"^[\w .-]{1,64}$")  # a column name an error may quote
HEADER_NAMES = 100
NOT_QUOTED = "a first line that is not a header of named columns (not quoted: it may be any file's content)"
HF_PREFIX = "hf://datasets/"
# What a storage object's metadata says about its content, by filesystem (s3: ETag, gcs: md5Hash
# and generation, others: size and modification time): the digest of a remote file read without
# reading it.
REMOTE_FINGERPRINT = ("ETag", "etag", "md5Hash", "crc32c", "generation", "VersionId", "size", "LastModified",
                      "mtime", "updated")


class DataError(ValueError):
    """The data file is missing, unreadable or not in the expected form."""


SYSTEM_DIRS = ("/proc", "/sys", "/dev")  # the kernel's and devices' files: never data, anywhere


def location_problem(location: str) -> str | None:
    """Why ``location`` (``data.path`` or ``data.val_path``) cannot be data, or None: a local path
    (or ``file://`` URI) under /proc, /sys or /dev once symlinks are resolved, or a local path
    that does not exist or is not a file or directory. Other URIs are looked at when read."""
    local = local_path(location)
    if local is not None and (problem := system_path_problem(local)):
        return problem
    if is_uri(location):
        return None
    p = Path(location).expanduser()
    if not p.exists():
        return f"file not found: {p.resolve()} (relative paths resolve against the current directory)"
    if not (p.is_file() or p.is_dir()):
        return f"{p.resolve()} is not a regular file or a directory (a device or pipe cannot be read as training data)"
    return None


def system_path_problem(path: Path) -> str | None:
    """Why ``path`` is never read as data, or None: it is, or resolves to, a file of /proc, /sys
    or /dev (a process's environment, a device), which an error could quote into a job's log."""
    real = Path(path).expanduser().resolve()
    for d in SYSTEM_DIRS:
        if real == Path(d) or Path(d) in real.parents:
            return f"{real} is under {d}: a system file or device is never read as training data"
    return None


def data_root_problem(field: str, location: str | None, roots: list[str]) -> str | None:
    """Why a job on a cluster may not read ``location``, or None: a local path or ``file://`` URI
    must lie under one of the cluster's data ``roots`` (store.data_roots: ``$LORA_DIST_DATA_ROOT``,
    else its output root) once decoded and resolved; a storage or hub URI is the storage's
    business (its credentials decide)."""
    local = None if location is None else local_path(location)
    if local is None:
        return None
    try:
        place = confine(location if is_uri(location) else local)
    except JobError as e:
        return f"{field}: {e}"
    if any(under(place, root) for root in roots):
        return None
    return (f"{field}: {place} is outside this cluster's data root ({', '.join(roots)}): a job on a cluster reads "
            f"data only under LORA_DIST_DATA_ROOT (else LORA_DIST_OUTPUT_ROOT), or from a storage URI")


def local_path(location: str) -> Path | None:
    """The local path a location names (``file://`` URIs included); None for a remote URI."""
    if location.startswith("file://"):
        return Path(unquote(urlparse(location).path))
    return None if is_uri(location) else Path(location).expanduser()


@dataclass(frozen=True)
class DataFile:
    """One data location, read as rows.

    Attributes:
        location: the path or URI as the spec gives it.
        field: the spec field that names it (``data.path``, ``data.val_path``), in every error.
        default: the format of a file whose name says none (the source's own: csv for e2e).
        revision: ``hf://`` only, the branch, tag or commit.
        split: ``hf://`` or a ``save_to_disk`` DatasetDict: the split to read.
    """

    location: str
    field: str = "data.path"
    default: str = "jsonl"
    revision: str | None = None
    split: str = "train"

    @property
    def kind(self) -> str:
        """``jsonl``, ``json``, ``csv``, ``parquet``, ``disk`` (a save_to_disk directory) or ``hf``."""
        if self.location.startswith(HF_PREFIX):
            return "hf"
        local = local_path(self.location)
        if local is not None and local.is_dir():
            return "disk"
        if local is None and not Path(urlparse(self.location).path).suffix:
            return "disk"  # a remote directory
        suffix = Path(urlparse(self.location).path if local is None else local).suffix.lstrip(".").lower()
        return suffix if suffix in FORMATS else self.default

    def where(self, n: int) -> str:
        """How a row is named in an error: a JSONL or CSV file's line, a table's row."""
        return f"line {n}" if self.kind == "jsonl" else f"row {n}"

    def error(self, text: str) -> DataError:
        return DataError(f"{self.field}: {self.location}: {text}")

    def check(self) -> None:
        """Raise when a local location is missing (a remote one is found when read)."""
        if self.kind == "hf":
            if len(self.location[len(HF_PREFIX):].strip("/").split("/")) != 2:
                raise self.error("expected hf://datasets/ORG/NAME")
            return
        local = local_path(self.location)
        if local is not None and not local.exists():
            raise DataError(f"{self.field}: file not found: {local.resolve()}")
        problem = location_problem(self.location)  # again when read: a symlink may have been swapped since
        if problem:
            raise DataError(f"{self.field}: {problem}")

    # --- content digest ---------------------------------------------------------------------------

    def digest(self) -> str:
        """What the rows are a function of: a local file's sha256, a directory's files' sha256s, a
        remote object's checksum or version as its storage reports it, a hub dataset's commit and
        fingerprint."""
        self.check()
        local = local_path(self.location)
        if self.kind == "hf":
            ds = _hub_dataset(self.location[len(HF_PREFIX):].strip("/"), self.revision, self.split, self.field)
            # the prepared files' paths hold the commit they were made from
            return "hf:" + _combine({"fingerprint": ds._fingerprint, "files": [c["filename"] for c in ds.cache_files]})
        if local is not None and local.is_file():
            return sha256_file(local)
        if local is not None:
            if not any((local / n).is_file() for n in ("dataset_dict.json", "state.json")):  # before hashing a tree
                raise self.error("a directory, but not one written by datasets' save_to_disk (it has neither "
                                 "dataset_dict.json nor state.json)")
            files = sorted(f for f in local.rglob("*") if f.is_file())
            return _combine({str(f.relative_to(local)): sha256_file(f) for f in files})
        fs, path = self._fs()
        try:
            entries = fs.find(path, detail=True) if fs.isdir(path) else {path: fs.info(path)}
        except (OSError, ValueError) as e:
            raise self.error(f"cannot read ({e})") from None
        if not entries:
            raise self.error("not found")
        return _combine({name: {k: str(info[k]) for k in REMOTE_FINGERPRINT if k in info}
                         for name, info in entries.items()})

    def _fs(self):
        import fsspec

        try:
            return fsspec.core.url_to_fs(self.location)
        except (ImportError, ValueError) as e:
            raise self.error(f"cannot open this URI ({e})") from None

    # --- rows ------------------------------------------------------------------------------------

    def columns(self) -> list[str] | None:
        """The column names when the format declares them up front (a CSV header, a table's
        features); None for JSONL, whose every line says its own."""
        if self.kind == "jsonl":
            return None
        if self.kind == "csv":
            with self._open() as f:
                try:
                    return csv.DictReader(f).fieldnames or []
                except csv.Error as e:
                    raise self.error(f"not a readable csv ({e})") from None
        try:
            names = self._table.column_names
        except DataError:
            raise
        except Exception as e:  # noqa: BLE001 - whatever the reader raises, the file is what is wrong
            raise self.error(f"cannot read ({type(e).__name__}: {e})") from None
        return list(names) if names is not None else None

    def quotable_columns(self) -> list[str] | None:
        """:meth:`columns` if an error may quote them, else None: a table's features, or a CSV
        header that parsed as one (names of letters, digits, ' ', '_', '.', '-', at most
        :data:`HEADER_NAMES`, and a next row of as many fields). Anything else is the file's
        content, which could be a secret (a token file, an environment) and is never quoted."""
        found = self.columns()
        if found is None or len(found) > HEADER_NAMES or not all(HEADER_NAME.match(c or "") for c in found):
            return None
        if self.kind == "csv":
            try:
                with self._open() as f:
                    reader = csv.reader(f)
                    next(reader, None)
                    row = next(reader, None)
            except (OSError, UnicodeDecodeError, csv.Error, DataError):
                return None
            if row is None or len(row) != len(found):
                return None
        return found

    def rows(self) -> Iterator[tuple[int, Any]]:
        """``(n, row)`` for every row, in order, streamed: n the 1-based line (JSONL: blank lines
        are skipped but counted) or row number (header excluded). A row is a mapping of column to
        value; a JSONL line may hold any JSON value, which the source then refuses by line.

        Raises:
            DataError: the location cannot be read, or a line is not JSON.
        """
        self.check()
        if self.kind == "jsonl":
            yield from self._jsonl_rows()
        elif self.kind == "csv":
            yield from self._csv_rows()
        else:
            yield from self._table_rows()

    def _open(self):
        local = local_path(self.location)
        try:
            # utf-8-sig: a file saved with a byte-order mark (Excel's "CSV UTF-8") has its first
            # column named "mr", not "\ufeffmr"; files without one read as plain UTF-8
            if local is not None:
                return open(local, encoding="utf-8-sig", newline="")
            fs, path = self._fs()
            return io.TextIOWrapper(fs.open(path, "rb"), encoding="utf-8-sig", newline="")
        except OSError as e:
            raise DataError(f"{self.field}: cannot read {self.location}: {e}") from None

    def _jsonl_rows(self) -> Iterator[tuple[int, Any]]:
        try:
            with self._open() as f:
                for n, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        obj = safejson.loads(line)
                    except json.JSONDecodeError as e:
                        raise DataError(f"{self.field}: {self.location} line {n}: not JSON ({e.msg})") from None
                    except ValueError as e:  # nested too deep
                        raise DataError(f"{self.field}: {self.location} line {n}: {e}") from None
                    yield n, obj
        except (OSError, UnicodeDecodeError) as e:
            raise DataError(f"{self.field}: cannot read {self.location}: {e}") from None

    def _csv_rows(self) -> Iterator[tuple[int, dict]]:
        try:
            with self._open() as f:
                for n, row in enumerate(csv.DictReader(f), 1):
                    yield n, row
        except (OSError, UnicodeDecodeError, csv.Error) as e:
            raise DataError(f"{self.field}: cannot read {self.location}: {e}") from None

    @functools.cached_property
    def _table(self):
        """The rows as ``datasets`` reads them: a streamed IterableDataset (json, parquet), or a
        memory-mapped Dataset (save_to_disk, hub); made once per DataFile (columns, then rows)."""
        if self.kind == "hf":
            return _hub_dataset(self.location[len(HF_PREFIX):].strip("/"), self.revision, self.split, self.field)
        if self.kind == "disk":
            return _disk_dataset(self.location, self.split, self.field)
        from datasets import load_dataset

        _quiet()
        return load_dataset(self.kind, data_files=self.location, split="train", streaming=True)

    def _table_rows(self) -> Iterator[tuple[int, dict]]:
        n = 0
        try:
            for n, row in enumerate(self._table, 1):
                yield n, row
        except DataError:
            raise
        except Exception as e:  # noqa: BLE001 - pyarrow, fsspec and datasets each raise their own
            at = f" after row {n}" if n else ""
            raise self.error(f"cannot read{at} ({type(e).__name__}: {e})") from None


def _combine(parts: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def _quiet() -> None:
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()


def _disk_dataset(location: str, split: str, field: str):
    from datasets import DatasetDict, load_from_disk

    _quiet()
    try:
        ds = load_from_disk(location)
    except (FileNotFoundError, ValueError, OSError) as e:
        raise DataError(f"{field}: {location}: a directory, but not one written by datasets' save_to_disk "
                        f"({e})") from None
    if isinstance(ds, DatasetDict):
        if split not in ds:
            raise DataError(f"{field}: {location} has splits {', '.join(ds)}, not {split!r}: set data.hf_split")
        ds = ds[split]
    return ds


@lru_cache(maxsize=4)
def _hub_dataset(name: str, revision: str | None, split: str, field: str):
    """A hub dataset through ``datasets``' own cache (honours HF_HOME, HF_HUB_OFFLINE, HF_TOKEN):
    downloaded and prepared once, then memory-mapped."""
    from datasets import load_dataset

    _quiet()
    try:
        return load_dataset(name, revision=revision, split=split)
    except Exception as e:  # noqa: BLE001 - the hub, the network and the builders each raise their own
        raise DataError(f"{field}: hf://datasets/{name} (revision {revision or 'main'}, split {split!r}) cannot "
                        f"be loaded ({type(e).__name__}: {str(e)[:500]}). Check the name, revision and "
                        f"data.hf_split, HF_TOKEN for a gated dataset, or HF_HUB_OFFLINE with a cache that has "
                        f"it") from None
