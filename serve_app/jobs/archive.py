"""Uploaded archives (zip; tar plain, gzip, bzip2 or xz): listed and unpacked with every
bound checked. No Ray, no torch.

`inspect` reads the listing only; `extract` makes the same checks again while writing, and
counts the bytes it writes. Refused: more entries or declared bytes than the limits, a zip
member that inflates too far, names that could leave the folder (absolute, `..`, backslashes,
drive letters, NUL), links, devices, fifos, encrypted zip members, a name given twice. Only
regular files are written. Where Python's readers are not bounded on their own (a zip's
central directory, tar's pax headers), the bound is checked before they read.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import os
import re
import shutil
import stat
import struct
import tarfile
import zipfile
import zlib
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from serve_app.errors import ApiError

MAX_NAME_CHARS = 1024
MAX_DEPTH = 32
MAX_PART_BYTES = 255                  # one path component, as Linux filesystems allow
HEADER_ALLOWANCE = 64 * 1024          # a tar entry's own headers (pax, long name, sparse map)
MAX_DIGIT_RUN = 32                    # in those headers (see _Allowance)
CHUNK = 64 * 1024
DIRECTORY_BYTES_PER_ENTRY = 2048      # a zip's record with the longest name, and extra fields
ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")  # a zip with members, an empty zip
ZIP_METHODS = (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA)
_DRIVE = re.compile(r"[A-Za-z]:")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_DIGITS = re.compile(rb"[0-9]+")
# What a corrupt archive raises from Python's readers, beside their own errors
_READ_ERRORS = (zipfile.BadZipFile, tarfile.TarError, zlib.error, lzma.LZMAError, EOFError,
                OSError, ValueError, struct.error, NotImplementedError, RuntimeError)


class InvalidArchive(ValueError):
    """An archive that is refused (422 invalid_archive); nothing of it is kept."""

    def api_error(self) -> ApiError:
        return ApiError(422, "invalid_archive", str(self))


@dataclass(frozen=True)
class ArchiveLimits:
    max_entries: int = 10_000
    max_unpacked_bytes: int = 2 * 1024**3
    max_ratio: float = 200.0          # unpacked / packed bytes of any one member (zip bombs)
    # Smaller members are not held to max_ratio: a second of silence in a wav deflates 1000:1,
    # and max_unpacked_bytes bounds them all together anyway.
    ratio_floor_bytes: int = 1024**2


@dataclass(frozen=True)
class ArchiveSummary:
    kind: str            # "zip" or "tar"
    entries: int
    unpacked_bytes: int  # as declared by the archive's headers


def _shown(name: str) -> str:
    return repr(name[:120] + ("..." if len(name) > 120 else ""))


def member_parts(name: str) -> tuple[str, ...]:
    """An entry's name as path components under the destination; InvalidArchive for a name
    that could leave it or that a filesystem would not take. `.` and empty components are
    dropped (`./a//b` is `a/b`); the archive's root folder has no components."""
    shown = _shown(name)
    if "\x00" in name:
        raise InvalidArchive(f"entry {shown}: NUL in its name")
    if "\\" in name:
        raise InvalidArchive(f"entry {shown}: a backslash in its name")
    if name.startswith("/"):
        raise InvalidArchive(f"entry {shown}: an absolute name")
    if _DRIVE.match(name):
        raise InvalidArchive(f"entry {shown}: a drive letter")
    if _CONTROL.search(name):
        raise InvalidArchive(f"entry {shown}: a control character in its name")
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidArchive(f"entry {shown}: its name is not UTF-8") from None
    parts = tuple(part for part in name.split("/") if part not in ("", "."))
    if ".." in parts:
        raise InvalidArchive(f"entry {shown}: a '..' component")
    if len(name) > MAX_NAME_CHARS or len(parts) > MAX_DEPTH or \
            any(len(part.encode()) > MAX_PART_BYTES for part in parts):
        raise InvalidArchive(f"entry {shown}: a name over {MAX_NAME_CHARS} characters, "
                             f"{MAX_DEPTH} folders deep or {MAX_PART_BYTES} bytes a component")
    return parts


class _Listing:
    """The entries seen so far, each checked against the limits and the others on arrival."""

    def __init__(self, kind: str, limits: ArchiveLimits):
        self.kind, self.limits = kind, limits
        self.entries = self.declared = 0
        self.files: set[str] = set()
        self.dirs: set[str] = set()           # named or implied by a file's path
        self.named_dirs: set[str] = set()

    def add(self, name: str, is_dir: bool, declared: int, packed: int | None = None
            ) -> tuple[str, ...]:
        self.entries += 1
        if self.entries > self.limits.max_entries:
            raise InvalidArchive(f"more than {self.limits.max_entries} entries")
        parts, shown = member_parts(name), _shown(name)
        if declared < 0:
            raise InvalidArchive(f"entry {shown}: a negative size")
        self.declared += declared
        if self.declared > self.limits.max_unpacked_bytes:
            raise InvalidArchive(f"entry {shown}: the archive declares more than "
                                 f"{self.limits.max_unpacked_bytes} bytes unpacked")
        if packed is not None and declared > self.limits.ratio_floor_bytes and \
                declared > self.limits.max_ratio * packed:
            raise InvalidArchive(f"entry {shown}: {declared} bytes from {packed} packed, a "
                                 f"ratio over {self.limits.max_ratio:g} (a zip bomb)")
        key = "/".join(parts)
        if key in self.files or key in self.named_dirs:
            raise InvalidArchive(f"entry {shown}: the name {key!r} is given twice")
        if is_dir:
            self.named_dirs.add(key)
        elif not parts:
            raise InvalidArchive(f"entry {shown}: a file without a name")
        elif key in self.dirs:
            raise InvalidArchive(f"entry {shown}: {key!r} is also a folder")
        else:
            self.files.add(key)
        # Ancestors, deepest first: once one is known, so are those above it
        for depth in range(len(parts) - (0 if is_dir else 1), 0, -1):
            folder = "/".join(parts[:depth])
            if folder in self.files:
                raise InvalidArchive(f"entry {shown}: {folder!r} is also a file")
            if folder in self.dirs:
                break
            self.dirs.add(folder)
        return parts

    def summary(self) -> ArchiveSummary:
        return ArchiveSummary(self.kind, self.entries, self.declared)


@contextmanager
def _reading(what: str):
    """Python's reader errors on a corrupt archive as InvalidArchive."""
    try:
        yield
    except InvalidArchive:
        raise
    except _READ_ERRORS as exc:
        raise InvalidArchive(f"{what}: {type(exc).__name__}: {exc}"[:500]) from exc


# -- zip ------------------------------------------------------------------------------------

def _zip_is_dir(info: zipfile.ZipInfo) -> bool:
    name, mode = info.orig_filename, info.external_attr >> 16
    file_type, shown = stat.S_IFMT(mode), _shown(name)
    if info.flag_bits & 0x1:
        raise InvalidArchive(f"entry {shown}: encrypted")
    if file_type == stat.S_IFLNK:
        raise InvalidArchive(f"entry {shown}: a symbolic link")
    if file_type not in (0, stat.S_IFREG, stat.S_IFDIR):  # 0: made where modes are not kept
        raise InvalidArchive(f"entry {shown}: a device file, fifo or socket")
    if info.compress_type not in ZIP_METHODS:
        raise InvalidArchive(f"entry {shown}: compression method {info.compress_type} "
                             "(stored, deflate, bzip2 and lzma are read)")
    return info.is_dir() or file_type == stat.S_IFDIR


def _zip_directory(path: Path) -> tuple[int, int]:
    """(entries, bytes) of a zip's central directory, as its end record declares them: read
    before zipfile, which parses the whole directory into memory, whatever its size."""
    with open(path, "rb") as file:
        size = file.seek(0, os.SEEK_END)
        file.seek(max(0, size - 22 - 65535))   # the end record, and a comment of 64 KiB
        tail = file.read()
        at = len(tail) - 22 if tail[-22:-18] == b"PK\x05\x06" else tail.rfind(b"PK\x05\x06")
        if at < 0 or len(tail) - at < 22:
            raise InvalidArchive("not a readable zip: no end of central directory record")
        entries, directory_bytes = struct.unpack_from("<10xHL", tail, at)
        if entries == 0xFFFF or directory_bytes == 0xFFFFFFFF:  # zip64: its locator before
            locator = tail[at - 20:at] if at >= 20 else b""
            if locator[:4] != b"PK\x06\x07":
                raise InvalidArchive("not a readable zip: no zip64 end record locator")
            file.seek(struct.unpack_from("<8xQ", locator)[0])
            record = file.read(56)
            if len(record) < 56 or record[:4] != b"PK\x06\x06":
                raise InvalidArchive("not a readable zip: no zip64 end record")
            entries, directory_bytes = struct.unpack_from("<32xQQ", record)
    return entries, directory_bytes


def _is_zip(path: Path) -> bool:
    with open(path, "rb") as file:
        return file.read(4) in ZIP_MAGIC


def _open_zip(path: Path, limits: ArchiveLimits) -> zipfile.ZipFile:
    entries, directory_bytes = _zip_directory(path)
    if entries > limits.max_entries:
        raise InvalidArchive(f"more than {limits.max_entries} entries ({entries})")
    if directory_bytes > limits.max_entries * DIRECTORY_BYTES_PER_ENTRY:
        raise InvalidArchive(f"a central directory of {directory_bytes} bytes: more than "
                             f"{limits.max_entries} entries would need")
    with _reading("not a readable zip"):
        return zipfile.ZipFile(path)


def _zip_listing(archive: zipfile.ZipFile, limits: ArchiveLimits
                 ) -> tuple[_Listing, list[tuple[zipfile.ZipInfo, tuple[str, ...]]]]:
    listing, files = _Listing("zip", limits), []
    for info in archive.infolist():
        is_dir = _zip_is_dir(info)
        # orig_filename: zipfile's filename silently stops at a NUL
        parts = listing.add(info.orig_filename, is_dir, info.file_size, info.compress_size)
        if not is_dir:
            files.append((info, parts))
    return listing, files


# -- tar ------------------------------------------------------------------------------------

class _Allowance:
    """The decompressed tar stream, every read within an allowance the caller sets: tarfile
    reads a pax, long-name or sparse-map header in one read of the size it declares. And
    Python before 3.11.10 searches a pax header with a regex quadratic in a run of digits
    (CVE-2024-6232: 64 KiB of digits cost seconds), so long runs are refused first."""

    def __init__(self, stream):
        self.stream = stream
        self.headers()

    def headers(self) -> None:
        self.left, self.in_headers = HEADER_ALLOWANCE, True

    def data(self, size: int) -> None:
        self.left, self.in_headers = size, False

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0 or size > self.left:
            raise InvalidArchive(f"an entry's tar headers (pax, long name or sparse map) over "
                                 f"{HEADER_ALLOWANCE} bytes")
        data = self.stream.read(size)
        self.left -= len(data)
        if self.in_headers and size > tarfile.BLOCKSIZE and \
                max(map(len, _DIGITS.findall(data)), default=0) > MAX_DIGIT_RUN:
            raise InvalidArchive(f"a tar header with more than {MAX_DIGIT_RUN} digits in a row")
        return data

    def __getattr__(self, name: str):
        return getattr(self.stream, name)  # seek, tell: forward seeks decompress, unseen


# By magic number, as tarfile's "r:*" tells them apart
_COMPRESSED = ((b"\x1f\x8b", lambda raw: gzip.GzipFile(fileobj=raw, mode="rb")),
               (b"BZh", bz2.BZ2File), (b"\xfd7zXZ\x00", lzma.LZMAFile))


@contextmanager
def _open_tar(path: Path) -> Iterator[tuple[tarfile.TarFile, _Allowance]]:
    """A tar, plain or compressed, read through an _Allowance."""
    with ExitStack() as stack:
        raw = stack.enter_context(open(path, "rb"))
        magic = raw.read(6)
        raw.seek(0)
        opener = next((open_ for prefix, open_ in _COMPRESSED if magic.startswith(prefix)),
                      None)
        reads = _Allowance(stack.enter_context(opener(raw)) if opener else raw)
        with _reading("not a zip or tar archive (plain, gzip, bzip2 or xz)"):
            archive = stack.enter_context(tarfile.open(fileobj=reads, mode="r:"))
        yield archive, reads


def _tar_entries(archive: tarfile.TarFile, reads: _Allowance, listing: _Listing
                 ) -> Iterator[tuple[tarfile.TarInfo, tuple[str, ...]]]:
    """Each entry, checked as it is read, refused before the stream goes past its data: a
    compressed bomb costs at most the limits' worth of decompression. Yields regular files
    (folders are checked, not yielded)."""
    member = archive.next()  # the first, read when the archive was opened
    while member is not None:
        shown = _shown(member.name)
        if member.issym() or member.islnk():
            kind = "symbolic" if member.issym() else "hard"
            raise InvalidArchive(f"entry {shown}: a {kind} link to {_shown(member.linkname)}")
        if member.ischr() or member.isblk() or member.isfifo():
            raise InvalidArchive(f"entry {shown}: a device file or fifo")
        if member.issparse() or not (member.isreg() or member.isdir()):
            kind = "a sparse file" if member.issparse() else f"tar type {member.type!r}"
            raise InvalidArchive(f"entry {shown}: {kind} (regular files and folders are read)")
        parts = listing.add(member.name, member.isdir(), 0 if member.isdir() else member.size)
        if member.isreg():
            yield member, parts
        reads.headers()
        with _reading(f"after entry {shown}"):
            member = archive.next()


# -- listing and extraction -----------------------------------------------------------------

def inspect(path: Path, limits: ArchiveLimits) -> ArchiveSummary:
    """The archive's kind, entries and declared bytes, from its listing alone; InvalidArchive
    names the first entry refused."""
    if _is_zip(path):
        with _open_zip(path, limits) as archive:
            return _zip_listing(archive, limits)[0].summary()
    listing = _Listing("tar", limits)
    with _open_tar(path) as (archive, reads):
        for _ in _tar_entries(archive, reads, listing):
            pass
    return listing.summary()


def _write(source, target: Path, shown: str, declared: int, written: int,
           limits: ArchiveLimits) -> int:
    """One member's bytes to a new regular file, counted; the bytes written."""
    target.parent.mkdir(parents=True, exist_ok=True)
    # O_EXCL and O_NOFOLLOW: never onto something already there, never through a link
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    count = 0
    with open(fd, "wb") as out:
        while True:
            with _reading(f"entry {shown}"):
                chunk = source.read(CHUNK)
            if not chunk:
                break
            count += len(chunk)
            if count > declared:
                raise InvalidArchive(f"entry {shown}: more bytes than its header declares "
                                     f"({declared})")
            if written + count > limits.max_unpacked_bytes:
                raise InvalidArchive(f"entry {shown}: more than "
                                     f"{limits.max_unpacked_bytes} bytes unpacked")
            out.write(chunk)
    if count < declared:
        raise InvalidArchive(f"entry {shown}: {count} bytes where its header declares "
                             f"{declared}")
    return count


def _empty_folder(dest: Path) -> bool:
    """dest as an empty folder; True if it was created here."""
    if dest.is_symlink() or (dest.exists() and (not dest.is_dir() or any(dest.iterdir()))):
        raise FileExistsError(f"{dest} exists and is not an empty folder")
    created = not dest.exists()
    dest.mkdir(parents=True, exist_ok=True)
    return created


def _remove_written(dest: Path, created: bool) -> None:
    for child in [dest] if created else list(dest.iterdir()):
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child, ignore_errors=True)
        else:
            child.unlink(missing_ok=True)


def _sources(path: Path, limits: ArchiveLimits
             ) -> Iterator[tuple[tuple[str, ...], str, int, IO[bytes]]]:
    """Each regular file's path components, name as shown, declared size and reader, every
    check made on the way; a zip's whole listing first (a zip refused writes nothing)."""
    if _is_zip(path):
        with _open_zip(path, limits) as archive:
            for info, parts in _zip_listing(archive, limits)[1]:
                shown = _shown(info.orig_filename)
                with _reading(f"entry {shown}"):
                    source = archive.open(info)
                yield parts, shown, info.file_size, source
        return
    with _open_tar(path) as (archive, reads):
        for member, parts in _tar_entries(archive, reads, _Listing("tar", limits)):
            shown = _shown(member.name)
            reads.data(member.size)
            with _reading(f"entry {shown}"):
                source = archive.extractfile(member)
            yield parts, shown, member.size, source


def extract(path: Path, dest: Path, limits: ArchiveLimits) -> list[Path]:
    """The archive's regular files written under dest (created; refused if it exists and is
    not empty), sorted. Every check of `inspect` is made again, and the bytes written are
    counted against the limits; on any refusal or error what was written is removed."""
    dest = Path(dest)
    created = _empty_folder(dest)
    written: list[Path] = []
    total = 0
    try:
        for parts, shown, declared, source in _sources(path, limits):
            target = dest.joinpath(*parts)
            with source:
                total += _write(source, target, shown, declared, total, limits)
            written.append(target)
    except BaseException:
        _remove_written(dest, created)
        raise
    return sorted(written)
