"""DATA for `heads train` and `heads evaluate`: labelled clips, from

- a folder of folders: each sub-folder's name is a label, its audio files (searched
  recursively) that label's clips; its columns are `path`, `label` and `folder` (the first
  folder below the label's, e.g. a speaker's: `--group-by folder`);
- a manifest (.csv, .jsonl or .parquet): `path` and `label`, optionally `start_s` and `end_s`
  (a segment of a longer recording) and `group`, any other columns too; relative paths are
  relative to the manifest's folder;
- the output of `emotion2vec-serve batch --embeddings` with a label column added (a folder of
  parts, or one Parquet file with an `embedding` column): the embeddings are used as they are,
  nothing is decoded again, and the backbone is the one its rows name.

No Ray, no torch.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from serve_app.heads.headfile import LABEL

MANIFEST_SUFFIXES = (".csv", ".jsonl", ".parquet")
GROUP_COLUMN = "group"  # a manifest's groups when --group-by is not given
FOLDER_COLUMN = "folder"


class DataError(ValueError):
    """DATA cannot be read as labelled clips (exit status 2)."""


@dataclass(frozen=True)
class Clip:
    path: str                  # absolute
    label: str
    group: str | None = None
    start_s: float | None = None  # a segment of the file, or None: the whole file
    end_s: float | None = None
    embedding: np.ndarray | None = field(default=None, compare=False, repr=False)
    error: str | None = None   # batch output: why its row failed

    @property
    def where(self) -> str:
        """The clip as a report names it."""
        if self.start_s is None:
            return self.path
        return f"{self.path} [{self.start_s:g}-{self.end_s:g} s]"


@dataclass
class LabelledSet:
    clips: list[Clip]
    kind: str                    # "folders", "manifest" or "embeddings"
    group_by: str | None = None  # the column the groups came from
    backbone: dict | None = None  # embeddings: the checkpoint its rows name

    @property
    def labels(self) -> list[str]:
        return sorted({clip.label for clip in self.clips})

    def counts(self) -> dict[str, int]:
        found: dict[str, int] = {}
        for clip in self.clips:
            found[clip.label] = found.get(clip.label, 0) + 1
        return dict(sorted(found.items()))


def read(location: str | Path, group_by: str | None = None) -> LabelledSet:
    """DATA as labelled clips; DataError saying what is wrong."""
    path = Path(location).expanduser()
    if path.is_dir():
        if any(path.glob("part-*.parquet")):
            from serve_app.tools.batch.parts import read_rows

            return _from_rows(read_rows(path).to_pylist(), path, group_by)
        return _from_folders(path, group_by)
    if not path.is_file():
        raise DataError(f"no such file or folder: {location}")
    if path.suffix.lower() not in MANIFEST_SUFFIXES:
        raise DataError(f"{location}: give a folder of label folders, a manifest "
                        f"({', '.join(MANIFEST_SUFFIXES)}) or a batch job's output")
    return _from_rows(_manifest_rows(path), path.parent, group_by)


def _from_folders(root: Path, group_by: str | None) -> LabelledSet:
    from serve_app.tools.client import expand

    if group_by not in (None, FOLDER_COLUMN):
        raise DataError(f"label folders have the columns path, label and {FOLDER_COLUMN} (the "
                        f"folder below the label's); --group-by {group_by} is none of them")
    clips = []
    for folder in sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")):
        for file in expand([str(folder)]):
            below = file.relative_to(folder).parts
            group = below[0] if group_by and len(below) > 1 else None
            if group_by and group is None:
                raise DataError(f"{file}: --group-by {FOLDER_COLUMN} needs every clip in a "
                                f"folder below its label's ({folder.name}/GROUP/clip.wav)")
            clips.append(Clip(str(file.resolve()), folder.name, group))
    if not clips:
        raise DataError(f"{root}: no audio files in folders below it (one folder per label)")
    return _checked(LabelledSet(clips, "folders", group_by))


def _manifest_rows(path: Path) -> list[dict]:
    try:
        suffix = path.suffix.lower()
        if suffix == ".csv":
            with open(path, newline="", encoding="utf-8") as handle:
                return list(csv.DictReader(handle))
        if suffix == ".jsonl":
            lines = path.read_text(encoding="utf-8").splitlines()
            return [json.loads(line) for line in lines if line.strip()]
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    except (OSError, ValueError, UnicodeError) as exc:
        raise DataError(f"cannot read the manifest {path}: {exc}") from None


def _seconds(value, name: str, where: str) -> float | None:
    if value is None or value == "":
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if not math.isfinite(number) or number < 0:
        raise DataError(f"{where}: {name} must be a number of seconds from 0, not {value!r}")
    return number


def _from_rows(rows: list[dict], base: Path, group_by: str | None) -> LabelledSet:
    if not rows:
        raise DataError(f"{base}: no rows")
    columns = set(rows[0])
    embeddings = "embedding" in columns
    if "label" not in columns or not ({"path", "embedding"} & columns):
        raise DataError(f"{base}: rows need a label column and a path (or, from `batch "
                        f"--embeddings`, an embedding); the columns are {sorted(columns)[:12]}")
    group_column = group_by or (GROUP_COLUMN if GROUP_COLUMN in columns else None)
    if group_column and group_column not in columns:
        raise DataError(f"--group-by {group_column}: no such column; the columns are "
                        f"{sorted(columns)[:12]}")
    clips = []
    for number, row in enumerate(rows, start=1):
        where = f"row {number}"
        label = row.get("label")
        if label is None or str(label).strip() == "":
            raise DataError(f"{where}: no label")
        start, end = (_seconds(row.get(name), name, where) for name in ("start_s", "end_s"))
        if (start is None) != (end is None) or (start is not None and end <= start):
            raise DataError(f"{where}: give both start_s and end_s, the end after the start")
        group = row.get(group_column) if group_column else None
        if group_column and (group is None or str(group) == ""):
            raise DataError(f"{where}: no {group_column}")
        path = str(row.get("path") or f"row {number}")
        if not embeddings:
            path = str((base / Path(path).expanduser()).resolve())
        vector, error = None, None
        if embeddings:
            if row.get("status", "ok") != "ok" or row.get("embedding") is None:
                error = f"{row.get('error_code') or 'failed'}: {row.get('error') or 'no embedding'}"
            else:
                vector = np.asarray(row["embedding"], dtype=np.float32)
        clips.append(Clip(path, str(label).strip(), None if group is None else str(group),
                          start, end, vector, error))
    backbone = _backbone_of(rows) if embeddings else None
    return _checked(LabelledSet(clips, "embeddings" if embeddings else "manifest",
                                group_column, backbone))


def _backbone_of(rows: list[dict]) -> dict:
    """The checkpoint a batch output's rows were scored with (one, or a refusal)."""
    found = {(row.get("model_sha256"), row.get("model_version"), row.get("model_source"))
             for row in rows if row.get("embedding") is not None}
    if len(found) != 1 or next(iter(found))[0] is None:
        raise DataError("the embeddings must come from one checkpoint (one model_sha256 in "
                        f"the rows); found {len({key[0] for key in found})}")
    sha256, variant, source = next(iter(found))
    dims = {len(row["embedding"]) for row in rows if row.get("embedding") is not None}
    if len(dims) != 1:
        raise DataError(f"embeddings of several lengths: {sorted(dims)}")
    return {"arch": Path(str(source)).name, "sha256": sha256, "embedding_dim": dims.pop(),
            "variant": variant, "source": source}


def _checked(data: LabelledSet) -> LabelledSet:
    bad = sorted({clip.label for clip in data.clips if not LABEL.fullmatch(clip.label)
                  or clip.label.lower().startswith("unuse")})
    if bad:
        raise DataError(f"labels {bad[:5]} cannot name a head's labels: letters, digits, ' ', "
                        "'_', '.', '+', '-', at most 64, starting with a letter or digit")
    folded: dict[str, set[str]] = {}
    for label in data.labels:
        folded.setdefault(label.lower(), set()).add(label)
    twins = [sorted(names) for names in folded.values() if len(names) > 1]
    if twins:
        raise DataError(f"labels that differ only in case: {twins[:3]}")
    return data
