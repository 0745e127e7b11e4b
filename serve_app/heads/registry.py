"""Where heads are kept: `heads_dir`, a local directory or a filesystem URI (`s3://`, `gs://`,
`file://`) through pyarrow's filesystems, so that every node of a cluster sees the same heads.

Layout: `<heads_dir>/<name>/<revision>.safetensors`, revisions numbered from 1. A deleted
revision leaves `<revision>.deleted` behind (empty), so that a number is never given to other
weights: `support-calls@4` means one head for good. Files are written under a temporary name
and then moved in place; on a local filesystem the move is a hard link that fails when the
revision exists, so two uploads at once take two revisions.

The Router reads only headers (a head's metadata) and lists revisions; a variant replica
reads the files it serves (serve_app/heads/resident.py). No Ray, no torch.
"""

from __future__ import annotations

import os
import re
import uuid
from pathlib import Path

from serve_app.heads.headfile import (
    MAX_HEADER_BYTES,
    Head,
    InvalidHead,
    UnknownHead,
    decode,
    encode,
    metadata_of,
    read_header,
)

REVISION_FILE = re.compile(r"(?P<revision>[0-9]{1,9})\.(?P<state>safetensors|deleted)")
MAX_UPLOAD_ATTEMPTS = 16


def open_location(location: str):
    """(pyarrow FileSystem, path) of a directory or a URI; '~' is expanded for local ones."""
    from pyarrow import fs

    if "://" not in location:
        location = os.path.abspath(os.path.expanduser(location))
    return fs.FileSystem.from_uri(location)


def head_uri(location: str, name: str, revision: int) -> str:
    """Where one revision's file lives, as a location open_location reads."""
    base = location if "://" in location else os.path.abspath(os.path.expanduser(location))
    return f"{base.rstrip('/')}/{name}/{revision}.safetensors"


def read_file(uri: str) -> bytes:
    """A head file's bytes (UnknownHead when it is not there)."""
    filesystem, path = open_location(uri)
    try:
        with filesystem.open_input_stream(path) as stream:
            return stream.read()
    except (FileNotFoundError, OSError) as exc:
        if "not found" in str(exc).lower() or isinstance(exc, FileNotFoundError):
            raise UnknownHead(f"head file {uri} is gone") from None
        raise


def pick_revision(name: str, revision: int | None, live: list[int]) -> int:
    """The revision a reference means among the live ones (ascending): the one given, or the
    latest; UnknownHead, naming those there are, otherwise."""
    if revision is None and live:
        return live[-1]
    if revision in live:
        return revision
    known = f"; revisions: {live}" if live else ""
    shown = name if revision is None else f"{name}@{revision}"
    raise UnknownHead(f"no head {shown}{known}")


class HeadRegistry:
    """The heads under one heads_dir."""

    def __init__(self, location: str, max_head_bytes: int):
        self.location = location
        self.max_head_bytes = max_head_bytes
        self.fs, self.root = open_location(location)

    def _path(self, *parts: str) -> str:
        return "/".join([self.root.rstrip("/"), *parts])

    def _entries(self, path: str):
        from pyarrow import fs

        return self.fs.get_file_info(fs.FileSelector(path, allow_not_found=True))

    def names(self) -> list[str]:
        """Every head with at least one revision, sorted."""
        from pyarrow import fs

        return sorted(info.base_name for info in self._entries(self.root)
                      if info.type == fs.FileType.Directory and self.revisions(info.base_name))

    def _numbers(self, name: str) -> tuple[list[int], int]:
        """(live revisions ascending, the highest number ever used)."""
        live, highest = [], 0
        for info in self._entries(self._path(name)):
            match = REVISION_FILE.fullmatch(info.base_name)
            if match:
                number = int(match["revision"])
                highest = max(highest, number)
                if match["state"] == "safetensors":
                    live.append(number)
        return sorted(live), highest

    def revisions(self, name: str) -> list[int]:
        return self._numbers(name)[0]

    def latest(self, name: str, revision: int | None = None) -> int:
        """The revision a reference means: the one given, or the latest (UnknownHead)."""
        return pick_revision(name, revision, self.revisions(name))

    def read(self, name: str, revision: int | None = None) -> Head:
        """A revision's head (the latest when None), read and checked whole."""
        revision = self.latest(name, revision)
        return decode(read_file(self.uri(name, revision)), self.max_head_bytes)

    def metadata(self, name: str, revision: int) -> dict:
        """One revision's metadata, from its header alone."""
        path = self._path(name, f"{revision}.safetensors")
        try:
            with self.fs.open_input_file(path) as handle:
                first = handle.read(8)
                length = int.from_bytes(first, "little") if len(first) == 8 else 0
                data = first + handle.read(min(length, MAX_HEADER_BYTES + 1))
        except FileNotFoundError:
            raise UnknownHead(f"no head {name}@{revision}") from None
        return metadata_of(read_header(data))

    def uri(self, name: str, revision: int) -> str:
        return head_uri(self.location, name, revision)

    def put(self, data: bytes, name: str | None = None) -> Head:
        """Store a head file as the next revision of its name (or of `name`, which must then
        be the name in the file): checked whole first, nothing stored when it is invalid."""
        head = decode(data, self.max_head_bytes)
        if name is not None and head.name != name:
            raise InvalidHead(f"the file holds head {head.name!r}, not {name!r}")
        self.fs.create_dir(self._path(head.name), recursive=True)
        for _ in range(MAX_UPLOAD_ATTEMPTS):
            revision = self._numbers(head.name)[1] + 1
            stored = encode({**head.metadata, "revision": revision}, head.tensors)
            if self._publish(head.name, revision, stored):
                return decode(stored, self.max_head_bytes)
        raise RuntimeError(f"could not store {head.name}: {MAX_UPLOAD_ATTEMPTS} concurrent "
                           "uploads took every revision number tried")

    def _publish(self, name: str, revision: int, data: bytes) -> bool:
        """Write a revision's file under a temporary name, then move it in place; False when
        another upload took that revision meanwhile."""
        final = self._path(name, f"{revision}.safetensors")
        staging = self._path(name, f".upload-{uuid.uuid4().hex}")
        with self.fs.open_output_stream(staging) as stream:
            stream.write(data)
        if self.fs.type_name == "local":
            try:
                os.link(staging, final)  # fails when the revision exists: never overwritten
                return True
            except FileExistsError:
                return False
            finally:
                Path(staging).unlink(missing_ok=True)
        self.fs.move(staging, final)
        return True

    def delete(self, name: str, revision: int | None = None) -> list[int]:
        """Delete one revision, or every revision of a head (UnknownHead when none); the
        numbers stay taken. Returns the revisions deleted."""
        gone = [self.latest(name, revision)] if revision is not None else self.revisions(name)
        if not gone:
            raise UnknownHead(f"no head {name}")
        for number in gone:
            with self.fs.open_output_stream(self._path(name, f"{number}.deleted")):
                pass
            self.fs.delete_file(self._path(name, f"{number}.safetensors"))
        return gone
