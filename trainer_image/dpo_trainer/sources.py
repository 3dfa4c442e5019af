"""Rows of a DatasetSource, read either lazily (only as many as the data stage asks for) or as a whole split.

RowStream reads file by file, in the order `datasets` would: a Hub source's files are resolved as
`load_dataset` resolves them (config, data_dir, split) and downloaded one at a time with `hf_hub_download`,
so they land in the Hugging Face cache (HF_HOME) and a later run downloads none of them again. Parquet is
read batch by batch (a large shard is never loaded whole), JSON Lines line by line, other formats through
`datasets`' own builder for that one file. Nothing past the rows taken is downloaded or parsed.

load_source loads a whole split with `datasets` (in `num_proc` processes): what a run that trains by
epochs (maxSteps -1) needs.
"""

from __future__ import annotations

import glob
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dpo_trainer.errors import DatasetError, reraise
from dpojob_api.spec import DatasetSource

if TYPE_CHECKING:
    from datasets import Dataset

Row = dict[str, Any]

BATCH_ROWS = 1024
"""Rows per batch read from a file: the unit of lazy reading."""

_HF_URL = re.compile(r"^hf://datasets/(?P<repo>.+?)@(?P<revision>[^/]+)/(?P<path>.+)$")


def describe(source: DatasetSource, field_path: str) -> str:
    """How error messages and the log name a source: the spec field and the dataset."""
    if source.hub is not None:
        return f"{field_path}.hub: dataset {source.hub.name!r}"
    assert source.files is not None
    return f"{field_path}.files: {', '.join(source.files.paths)}"


def local_files(source: DatasetSource, field_path: str) -> list[str]:
    """The files a `files` source matches, sorted; none is an error naming the field."""
    assert source.files is not None
    files = sorted({f for pattern in source.files.paths for f in glob.glob(pattern)})
    if not files:
        raise DatasetError(f"{describe(source, field_path)}: no file matches")
    return files


def num_proc(cpu: str) -> int:
    """Worker processes for a whole-split pass: the pod's CPU request (a Kubernetes quantity such as "4", "500m"
    or "2.5") rounded down, at least 1 and at most the CPUs this machine has."""
    cores = Decimal(cpu[:-1]) / 1000 if cpu.endswith("m") else Decimal(cpu)
    return max(1, min(int(cores), os.cpu_count() or 1))


@dataclass
class RowStream:
    """The rows of one source, read on demand file by file; `rows_read`, `files_read` and `exhausted` say how far
    it got (the data stage's stats)."""

    source: DatasetSource
    field_path: str
    token: str | None
    rows_read: int = 0
    files_read: int = 0
    exhausted: bool = False
    _files: list[str] | None = None
    _builder: str = "json"
    _batches: Iterator[list[Row]] | None = None
    _first: list[Row] = field(default_factory=list)

    @property
    def where(self) -> str:
        return describe(self.source, self.field_path)

    @property
    def files(self) -> list[str]:
        """Every file of the split (Hub: repo paths, resolved once; nothing is downloaded yet)."""
        if self._files is None:
            self._files, self._builder = self._resolve()
        return self._files

    def _resolve(self) -> tuple[list[str], str]:
        """(files, datasets builder name) of the split."""
        if self.source.files is not None:
            files = local_files(self.source, self.field_path)
            return files, self.source.files.builder
        from datasets import load_dataset_builder

        hub = self.source.hub
        assert hub is not None
        try:
            builder = load_dataset_builder(
                hub.name, name=hub.config, data_dir=hub.data_dir, revision=hub.revision, token=self.token
            )
        except Exception as exc:
            reraise(exc, DatasetError, f"loading {self.where}")
        splits = builder.config.data_files or {}
        if hub.split not in splits:
            raise DatasetError(f"{self.where} has no split {hub.split!r} (splits: {', '.join(map(str, splits))})")
        return list(splits[hub.split]), builder.name

    @property
    def columns(self) -> list[str]:
        """Column names of the first rows: read (one batch of the first file) before anything else is."""
        if not self._first:
            self._first = next(self._batch_iterator(), [])
        if not self._first:
            raise DatasetError(f"{self.where} has no rows")
        return list(self._first[0])

    def __iter__(self) -> Iterator[Row]:
        """Each row once, in file order; stop iterating and nothing further is downloaded or read."""
        if self._first:
            first, self._first = self._first, []
            yield from self._counted(first)
        for batch in self._batch_iterator():
            yield from self._counted(batch)

    def _counted(self, batch: list[Row]) -> Iterator[Row]:
        for row in batch:
            self.rows_read += 1
            yield row

    def _batch_iterator(self) -> Iterator[list[Row]]:
        if self._batches is None:
            self._batches = self._read_all()
        return self._batches

    def _read_all(self) -> Iterator[list[Row]]:
        for name in self.files:
            path = self._download(name)
            self.files_read += 1
            try:
                yield from read_batches(path, self._builder)
            except DatasetError:
                raise
            except Exception as exc:
                reraise(exc, DatasetError, f"reading {self.where}: {Path(name).name}")
        if self.rows_read == 0 and not self._first:
            raise DatasetError(f"{self.where} has no rows")
        self.exhausted = True

    def _download(self, name: str) -> str:
        """A local path of one file; a Hub file goes through the HF cache (downloaded at most once)."""
        match = _HF_URL.match(name)
        if match is None:
            return name
        from huggingface_hub import hf_hub_download

        try:
            return hf_hub_download(
                match["repo"], match["path"], repo_type="dataset", revision=match["revision"], token=self.token
            )
        except Exception as exc:
            reraise(exc, DatasetError, f"downloading {match['path']} of {self.where}")


def read_batches(path: str, builder: str) -> Iterator[list[Row]]:
    """Rows of one local file, BATCH_ROWS at a time, without loading a large file whole where the format allows."""
    if builder == "parquet":
        import pyarrow.parquet as pq

        for batch in pq.ParquetFile(path).iter_batches(batch_size=BATCH_ROWS):
            if batch.num_rows:
                yield batch.to_pylist()
    elif builder == "json" and _is_json_lines(path):
        with open(path, encoding="utf-8") as lines:
            batch = []
            for line in lines:
                if line.strip():
                    batch.append(json.loads(line))
                    if len(batch) == BATCH_ROWS:
                        yield batch
                        batch = []
            if batch:
                yield batch
    else:  # a JSON array, CSV, Arrow, ...: datasets reads this one file
        from datasets import load_dataset

        dataset = load_dataset(builder, data_files=[path], split="train")
        for columns in dataset.iter(batch_size=BATCH_ROWS):
            yield [dict(zip(columns, values, strict=True)) for values in zip(*columns.values(), strict=True)]


def _is_json_lines(path: str) -> bool:
    """JSON Lines (one object per line, or a compressed file datasets must open) rather than one JSON document."""
    if path.endswith((".gz", ".bz2", ".xz", ".zst", ".zip")):
        return False
    with open(path, encoding="utf-8") as file:
        head = file.read(4096).lstrip()
    return not head.startswith("[")


def load_source(source: DatasetSource, field_path: str, token: str | None, processes: int = 1) -> Dataset:
    """A whole split through `datasets` (Hub or local files), prepared in `processes` processes; every failure names
    the spec field."""
    from datasets import load_dataset

    where = describe(source, field_path)
    proc = processes if processes > 1 else None
    try:
        if source.hub is not None:
            hub = source.hub
            dataset = load_dataset(
                hub.name,
                name=hub.config,
                split=hub.split,
                data_dir=hub.data_dir,
                revision=hub.revision,
                token=token,
                num_proc=proc,
            )
        else:
            assert source.files is not None
            files = local_files(source, field_path)
            builder = source.files.builder
            dataset = load_dataset(builder, data_files=files, split="train", num_proc=proc)
    except Exception as exc:
        reraise(exc, DatasetError, f"loading {where}")
    if len(dataset) == 0:
        raise DatasetError(f"{where} has no rows")
    return dataset
