"""The jobs API's pure parts, in-process (no cluster): uploaded archives (bombs, escapes,
links and devices refused; a good one unpacked byte for byte)."""

from __future__ import annotations

import gzip
import io
import os
import stat
import struct
import tarfile
import warnings
import zipfile
import zlib
from pathlib import Path

import pytest

from serve_app.errors import ApiError
from serve_app.jobs import archive
from serve_app.jobs.archive import ArchiveLimits, InvalidArchive

LIMITS = ArchiveLimits()


# -- building archives ----------------------------------------------------------------------

def deflate(data: bytes) -> bytes:
    packer = zlib.compressobj(9, zlib.DEFLATED, -15)
    return packer.compress(data) + packer.flush()


def raw_zip(members: list[dict]) -> bytes:
    """A zip written field by field, for what zipfile will not write: NUL in a name, the
    encrypted flag, sizes that lie, 100,000 entries (zip64 end record). A member: name
    (bytes); data, stored or deflated (True), or packed (deflated already, with size and
    crc); mode, flags; size and crc to declare other than the data's."""
    local, central = bytearray(), bytearray()
    for member in members:
        name, data = member["name"], member.get("data", b"")
        packed = member.get("packed", deflate(data) if member.get("deflated") else data)
        fields = (20, member.get("flags", 0), 0 if packed is data else 8, 0, 0x21,
                  member.get("crc", zlib.crc32(data)), len(packed),
                  member.get("size", len(data)), len(name))
        offset = len(local)
        local += struct.pack("<4s5H3L2H", b"PK\x03\x04", *fields, 0) + name + packed
        central += struct.pack("<4sH5H3L5H2L", b"PK\x01\x02", 0x031E, *fields, 0, 0, 0, 0,
                               member.get("mode", 0o100644) << 16, offset) + name
    count, end = len(members), b""
    if count >= 0xFFFF:
        end += struct.pack("<4sQ2H2L4Q", b"PK\x06\x06", 44, 45, 45, 0, 0, count, count,
                           len(central), len(local))
        end += struct.pack("<4sLQL", b"PK\x06\x07", 0, len(local) + len(central), 1)
    short = min(count, 0xFFFF)
    end += struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, short, short, len(central),
                       len(local), 0)
    return bytes(local + central + end)


def write_zip(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as packed:
        for name, data in members:
            packed.writestr(name, data)
    return path


def tar_entry(name: str, data: bytes = b"", kind: bytes = tarfile.REGTYPE, **fields):
    info = tarfile.TarInfo(name)
    info.type, info.size = kind, len(data) if kind == tarfile.REGTYPE else 0
    for key, value in fields.items():
        setattr(info, key, value)
    return info, data


def write_tar(path: Path, entries: list, mode: str = "w", **options) -> Path:
    with tarfile.open(path, mode, **options) as packed:
        for info, data in entries:
            packed.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return path


def tar_of_empty_files(count: int) -> bytes:
    """`count` empty regular files named 0000000, 0000001...: one header block each, a
    template's with the name and checksum replaced (tarfile takes seconds for 100,000)."""
    template = tarfile.TarInfo("0" * 7).tobuf(format=tarfile.USTAR_FORMAT)
    base = sum(template) - sum(template[148:156]) + 8 * ord(" ") - 7 * ord("0")
    middle, tail = template[7:148], template[156:]
    blocks = []
    for number in range(count):
        name = b"%07d" % number
        blocks.append(name + middle + b"%06o\0 " % (base + sum(name)) + tail)
    return b"".join(blocks) + bytes(1024)


def refused(path: Path, tmp_path: Path, limits: ArchiveLimits = LIMITS) -> str:
    """Both inspect and extract refuse the archive, the same way; nothing is left behind."""
    with pytest.raises(InvalidArchive) as listed:
        archive.inspect(path, limits)
    dest = tmp_path / "unpacked"
    with pytest.raises(InvalidArchive) as unpacked:
        archive.extract(path, dest, limits)
    assert not dest.exists()
    assert str(listed.value) == str(unpacked.value)
    return str(listed.value)


# -- archives: good ones --------------------------------------------------------------------

GOOD = [("take1/clip-a.wav", os.urandom(100_000)), ("take1/deeper/clip-b.flac", b"fLaC" * 999),
        ("notes.txt", b"speaker 1\n"), ("take2/empty.wav", b"")]


@pytest.fixture
def good_members() -> list[tuple[str, bytes]]:
    """GOOD, and an archive inside: a file like any other, not unpacked."""
    inner = io.BytesIO()
    with zipfile.ZipFile(inner, "w") as packed:
        packed.writestr("x.wav", b"RIFF")
    return [*GOOD, ("take2/inner.zip", inner.getvalue())]


@pytest.mark.parametrize("kind", ["zip", "tar", "tar.gz", "tar.bz2", "tar.xz"])
def test_a_good_nested_archive_is_unpacked_byte_for_byte(tmp_path, good_members, kind):
    path = tmp_path / f"upload.{kind}"
    if kind == "zip":
        write_zip(path, [("take1/", b""), *good_members])
        entries = len(good_members) + 1
    else:
        folder = tar_entry("./take1", kind=tarfile.DIRTYPE)
        files = [tar_entry(f"./{name}", data) for name, data in good_members]
        write_tar(path, [folder, *files], "w:" + kind.partition(".")[2])
        entries = len(good_members) + 1
    declared = sum(len(data) for _, data in good_members)
    assert archive.inspect(path, LIMITS) == archive.ArchiveSummary(
        kind.partition(".")[0], entries, declared)

    dest = tmp_path / "unpacked"
    written = archive.extract(path, dest, LIMITS)
    assert written == sorted(dest / name for name, _ in good_members)
    for name, data in good_members:
        target = dest / name
        assert target.read_bytes() == data
        assert stat.S_ISREG(target.lstat().st_mode) and not target.stat().st_mode & 0o111
    assert sorted(p for p in dest.rglob("*") if p.is_file()) == written


def test_extract_wants_an_empty_folder_and_leaves_it_empty_on_refusal(tmp_path, good_members):
    path = write_zip(tmp_path / "good.zip", good_members)
    full = tmp_path / "full"
    full.mkdir()
    (full / "kept").write_bytes(b"x")
    with pytest.raises(FileExistsError):
        archive.extract(path, full, LIMITS)
    assert (full / "kept").read_bytes() == b"x"

    empty = tmp_path / "empty"
    empty.mkdir()
    assert len(archive.extract(path, empty, LIMITS)) == len(good_members)
    bad = write_tar(tmp_path / "bad.tar", [tar_entry("a.wav", b"1" * 10),
                                           tar_entry("b", kind=tarfile.SYMTYPE, linkname="/")])
    again = tmp_path / "again"
    again.mkdir()
    with pytest.raises(InvalidArchive, match="symbolic link"):
        archive.extract(bad, again, LIMITS)
    assert again.is_dir() and not any(again.iterdir())


# -- archives: names, links, devices, duplicates ----------------------------------------------

BAD_NAMES = [("../evil.wav", "'..'"), ("take/../../evil.wav", "'..'"),
             ("/etc/cron.d/evil", "absolute"), ("C:/Windows/evil.wav", "drive letter"),
             ("c:evil.wav", "drive letter"), ("take\\..\\..\\evil.wav", "backslash"),
             ("evil\nname.wav", "control character")]


@pytest.mark.parametrize(("name", "why"), BAD_NAMES)
@pytest.mark.parametrize("kind", ["zip", "tar.gz"])
def test_names_that_could_leave_the_folder_are_refused(tmp_path, kind, name, why):
    path = tmp_path / f"upload.{kind}"
    if kind == "zip":
        path.write_bytes(raw_zip([{"name": b"fine.wav", "data": b"1"},
                                  {"name": name.encode(), "data": b"2"}]))
    else:
        write_tar(path, [tar_entry("fine.wav", b"1"), tar_entry(name, b"2")], "w:gz",
                  format=tarfile.PAX_FORMAT)
    message = refused(path, tmp_path)
    assert why in message and repr(name)[1:-1][:20] in message


@pytest.mark.parametrize("kind", ["zip", "tar"])
def test_nul_in_a_name_is_refused(tmp_path, kind):
    path = tmp_path / f"nul.{kind}"
    if kind == "zip":  # zipfile cuts a name at NUL: the check reads the name as stored
        path.write_bytes(raw_zip([{"name": b"clip.wav\x00.txt", "data": b"1"}]))
    else:  # only a pax header can carry NUL in a tar name
        info, data = tar_entry("clip.wav", b"1")
        info.pax_headers = {"path": "clip.wav\x00.txt"}
        write_tar(path, [(info, data)], format=tarfile.PAX_FORMAT)
    assert "NUL" in refused(path, tmp_path)


@pytest.mark.parametrize(("kind", "words"), [
    (tarfile.SYMTYPE, "a symbolic link to '/etc/passwd'"),
    (tarfile.LNKTYPE, "a hard link to '/etc/passwd'"),
    (tarfile.FIFOTYPE, "a device file or fifo"), (tarfile.CHRTYPE, "a device file or fifo"),
    (tarfile.BLKTYPE, "a device file or fifo"), (tarfile.CONTTYPE, None)])
def test_tar_links_and_devices_are_refused(tmp_path, kind, words):
    path = write_tar(tmp_path / "special.tar.gz",
                     [tar_entry("clip.wav", b"1"), tar_entry("special", kind=kind,
                                                             linkname="/etc/passwd")], "w:gz")
    if words is None:  # a contiguous file is a regular file
        assert archive.inspect(path, LIMITS).entries == 2
        return
    assert refused(path, tmp_path) == f"entry 'special': {words}"


@pytest.mark.parametrize(("mode", "words"), [
    (stat.S_IFLNK | 0o777, "a symbolic link"), (stat.S_IFIFO | 0o644, "fifo"),
    (stat.S_IFCHR | 0o644, "device"), (stat.S_IFSOCK | 0o644, "socket")])
def test_zip_links_and_devices_are_refused(tmp_path, mode, words):
    path = tmp_path / "special.zip"
    path.write_bytes(raw_zip([{"name": b"clip.wav", "data": b"1"},
                              {"name": b"special", "data": b"/etc/passwd", "mode": mode}]))
    assert words in refused(path, tmp_path)


def test_encrypted_zip_members_are_refused(tmp_path):
    path = tmp_path / "secret.zip"
    path.write_bytes(raw_zip([{"name": b"clip.wav", "data": b"12345678", "flags": 0x1}]))
    assert refused(path, tmp_path) == "entry 'clip.wav': encrypted"


@pytest.mark.parametrize(("names", "words"), [
    (["a.wav", "a.wav"], "given twice"), (["take/a.wav", "./take//a.wav"], "given twice"),
    (["take", "take/a.wav"], "'take' is also a file"),
    (["take/a.wav", "take"], "'take' is also a folder")])
@pytest.mark.parametrize("kind", ["zip", "tar"])
def test_duplicate_names_are_refused(tmp_path, kind, names, words):
    path = tmp_path / f"twice.{kind}"
    if kind == "zip":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # zipfile's own "Duplicate name" warning
            write_zip(path, [(name, b"1") for name in names])
    else:
        write_tar(path, [tar_entry(name, b"1") for name in names])
    assert words in refused(path, tmp_path)


def test_not_an_archive_is_refused(tmp_path):
    for name, data in [("empty", b""), ("text", b"hello " * 200), ("noise", os.urandom(4096)),
                       ("gzip-of-text", gzip.compress(b"hello " * 200)),
                       ("cut.zip", write_zip(tmp_path / "whole.zip",
                                             GOOD[:2]).read_bytes()[:-30])]:
        path = tmp_path / name
        path.write_bytes(data)
        message = refused(path, tmp_path)
        assert "not a zip or tar archive" in message or "not a readable zip" in message


# -- archives: bombs ------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["zip", "tar.gz"])
def test_100000_entries_are_refused_from_the_listing(tmp_path, kind):
    path = tmp_path / f"many.{kind}"
    if kind == "zip":
        path.write_bytes(raw_zip([{"name": b"%07d" % n} for n in range(100_000)]))
    else:
        path.write_bytes(gzip.compress(tar_of_empty_files(100_000), 1))
    assert "more than 10000 entries" in refused(path, tmp_path)


def test_the_crafted_archives_are_well_formed(tmp_path):
    """What raw_zip and tar_of_empty_files write is read as they mean it, under the limits."""
    path = tmp_path / "few.zip"
    path.write_bytes(raw_zip([{"name": b"a.wav", "data": b"abc", "deflated": True},
                              {"name": b"b.wav", "data": b"de"}]))
    assert archive.inspect(path, LIMITS) == archive.ArchiveSummary("zip", 2, 5)
    assert [p.read_bytes() for p in archive.extract(path, tmp_path / "z", LIMITS)] == \
        [b"abc", b"de"]
    path.write_bytes(raw_zip([{"name": b"%07d" % n} for n in range(70_000)]))  # zip64
    assert archive.inspect(path, ArchiveLimits(max_entries=70_000)).entries == 70_000
    path = tmp_path / "few.tar"
    path.write_bytes(tar_of_empty_files(3))
    assert len(archive.extract(path, tmp_path / "t", LIMITS)) == 3
    with tarfile.open(path) as packed:
        assert packed.getnames() == ["0000000", "0000001", "0000002"]


def test_a_zip_whose_end_record_understates_its_entries_is_still_counted(tmp_path):
    data = bytearray(raw_zip([{"name": b"%03d" % n} for n in range(20)]))
    end = data.rfind(b"PK\x05\x06")
    data[end + 8:end + 12] = struct.pack("<2H", 5, 5)   # "5 entries"
    path = tmp_path / "understated.zip"
    path.write_bytes(bytes(data))
    assert refused(path, tmp_path, ArchiveLimits(max_entries=10)) == "more than 10 entries"
    # Its directory's size is bounded too, before zipfile reads it all
    data = bytearray(raw_zip([{"name": b"%03d" % n + b"x" * 1000} for n in range(20)]))
    end = data.rfind(b"PK\x05\x06")
    data[end + 8:end + 12] = struct.pack("<2H", 5, 5)
    path.write_bytes(bytes(data))
    assert refused(path, tmp_path, ArchiveLimits(max_entries=10)) == (
        "a central directory of 20980 bytes: more than 10 entries would need")


@pytest.fixture(scope="module")
def zip_bomb(tmp_path_factory) -> Path:
    """200 MB of zeros in a 200 KB zip (deflate's ratio is about 1000)."""
    packer, zeros, crc = zlib.compressobj(9, zlib.DEFLATED, -15), bytes(1 << 20), 0
    chunks = []
    for _ in range(200):
        chunks.append(packer.compress(zeros))
        crc = zlib.crc32(zeros, crc)
    packed = b"".join(chunks) + packer.flush()
    path = tmp_path_factory.mktemp("bomb") / "bomb.zip"
    path.write_bytes(raw_zip([{"name": b"zeros.wav", "packed": packed, "size": 200 << 20,
                               "crc": crc}]))
    return path


def test_a_zip_bomb_is_refused_by_its_ratio_and_by_the_total(zip_bomb, tmp_path):
    message = refused(zip_bomb, tmp_path)
    assert message.startswith("entry 'zeros.wav': 209715200 bytes from ") and \
        "ratio over 200 (a zip bomb)" in message
    no_ratio = ArchiveLimits(max_ratio=float("inf"), max_unpacked_bytes=100 << 20)
    assert "declares more than 104857600 bytes" in refused(zip_bomb, tmp_path, no_ratio)
    # Allowed both, it unpacks (the bomb is well formed)
    loose = ArchiveLimits(max_ratio=float("inf"))
    [written] = archive.extract(zip_bomb, tmp_path / "loose", loose)
    assert written.stat().st_size == 200 << 20


def test_small_members_that_compress_well_are_not_bombs(tmp_path):
    path = write_zip(tmp_path / "silence.zip", [("silence.wav", bytes(500_000))])
    assert archive.inspect(path, LIMITS).unpacked_bytes == 500_000


@pytest.mark.parametrize("lie", ["smaller", "larger"])
def test_a_zip_whose_headers_lie_about_the_size_is_caught_by_extract(tmp_path, lie):
    data = os.urandom(2 << 20)  # incompressible: no ratio to give it away
    declared = 1000 if lie == "smaller" else 3 << 20
    path = tmp_path / "liar.zip"
    path.write_bytes(raw_zip([{"name": b"ok.wav", "data": b"fine"},
                              {"name": b"liar.wav", "data": data, "deflated": True,
                               "size": declared}]))
    assert archive.inspect(path, LIMITS).unpacked_bytes == 4 + declared  # the listing agrees
    dest = tmp_path / "unpacked"
    with pytest.raises(InvalidArchive, match="entry 'liar.wav': ") as caught:
        archive.extract(path, dest, LIMITS)
    assert ("Bad CRC-32" if lie == "smaller" else "where its header declares") in \
        str(caught.value)
    assert not dest.exists()


def test_a_compressed_tar_bomb_is_refused_at_its_header(tmp_path):
    """A header declaring 1 TiB, and no data: refused before the stream is read past it."""
    header = tarfile.TarInfo("huge.wav")
    header.size = 1 << 40
    path = tmp_path / "bomb.tar.gz"
    path.write_bytes(gzip.compress(
        tar_entry("first.wav", b"")[0].tobuf() + header.tobuf(format=tarfile.GNU_FORMAT)))
    assert refused(path, tmp_path) == \
        "entry 'huge.wav': the archive declares more than 2147483648 bytes unpacked"
    path.write_bytes(path.read_bytes()[:-10])   # truncated: still refused, as corrupt
    refused(path, tmp_path)


@pytest.mark.parametrize("header", ["pax", "long name", "digits"])
def test_tar_headers_that_tarfile_reads_whole_are_bounded(tmp_path, header):
    info, data = tar_entry("clip.wav", b"1")
    if header == "pax":   # 20 MB of pax header, 20 KB packed
        info.pax_headers = {"comment": "z" * (20 << 20)}
    elif header == "long name":
        info.name = "x/" * 100_000 + "clip.wav"
    else:  # the regex in Python's pax parser is quadratic in a run of digits
        info.pax_headers = {"comment": "1" * 60_000}
    path = tmp_path / "headers.tar.gz"
    fmt = tarfile.GNU_FORMAT if header == "long name" else tarfile.PAX_FORMAT
    write_tar(path, [(info, data)], "w:gz", format=fmt, compresslevel=1)
    message = refused(path, tmp_path)   # before tarfile reads or parses the header
    assert "digits in a row" in message if header == "digits" else "over 65536 bytes" in message


def test_a_tar_cut_inside_a_member_is_refused_by_extract(tmp_path):
    path = write_tar(tmp_path / "whole.tar", [tar_entry("a.wav", b"1" * 5000),
                                              tar_entry("b.wav", b"2" * 5000)])
    cut = tmp_path / "cut.tar"
    cut.write_bytes(path.read_bytes()[:512 * 14])  # inside b.wav's data
    dest = tmp_path / "unpacked"
    with pytest.raises(InvalidArchive, match="b.wav"):
        archive.extract(cut, dest, LIMITS)
    assert not dest.exists()


def test_archive_refusals_are_422_invalid_archive():
    error = InvalidArchive("entry 'x': an absolute name").api_error()
    assert isinstance(error, ApiError)
    assert (error.status, error.code, error.message) == (
        422, "invalid_archive", "entry 'x': an absolute name")

