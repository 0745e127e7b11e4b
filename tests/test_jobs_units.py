"""The jobs API's pure parts, in-process (no cluster): uploaded archives (bombs, escapes,
links and devices refused; a good one unpacked byte for byte) and callbacks (signatures, the
allow-list with a fake resolver, delivery to a real HTTP server on 127.0.0.1)."""

from __future__ import annotations

import gzip
import io
import os
import re
import socket
import ssl
import stat
import struct
import sys
import tarfile
import threading
import time
import warnings
import zipfile
import zlib
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from serve_app.errors import ApiError
from serve_app.jobs import archive, callbacks
from serve_app.jobs.archive import ArchiveLimits, InvalidArchive
from serve_app.jobs.callbacks import InvalidCallback

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
        folders = [tar_entry(name, kind=tarfile.DIRTYPE) for name in ("./", "./take1")]
        files = [tar_entry(f"./{name}", data) for name, data in good_members]  # as tar -C
        write_tar(path, [*folders, *files], "w:" + kind.partition(".")[2])
        entries = len(good_members) + 2
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


# -- callbacks: signatures ------------------------------------------------------------------

SECRET = "s3cret-for-tests"
BODY = b'{"job_id": "j-1", "state": "succeeded"}'


def test_a_signature_verifies_with_its_secret_body_and_time():
    header = callbacks.sign(SECRET, BODY, 1_700_000_000)
    assert re.fullmatch(r"t=1700000000,v1=[0-9a-f]{64}", header)
    assert callbacks.verify(SECRET, header, BODY, now=1_700_000_000)
    assert callbacks.verify(SECRET, header, BODY, now=1_700_000_299)
    assert not callbacks.verify(SECRET, header, BODY + b" ", now=1_700_000_000)    # tampered
    assert not callbacks.verify(SECRET, header, BODY.replace(b"j-1", b"j-2"), now=1_700_000_000)
    assert not callbacks.verify("another secret", header, BODY, now=1_700_000_000)
    assert not callbacks.verify(SECRET, header, BODY, now=1_700_000_301)     # stale
    assert not callbacks.verify(SECRET, header, BODY, now=1_699_999_000)     # from the future
    assert callbacks.verify(SECRET, header, BODY, tolerance_s=3600, now=1_700_001_000)
    fresh = callbacks.sign(SECRET, BODY, int(time.time()))
    assert callbacks.verify(SECRET, fresh, BODY)


def test_several_signatures_let_a_secret_be_rotated():
    old = callbacks.sign("old secret", BODY, 1_700_000_000)
    new = callbacks.sign("new secret", BODY, 1_700_000_000)
    both = f"{old},{new.split(',')[1]}"
    for secret in ("old secret", "new secret"):
        assert callbacks.verify(secret, both, BODY, now=1_700_000_000)
    assert not callbacks.verify("third secret", both, BODY, now=1_700_000_000)


@pytest.mark.parametrize("header", [
    "", "v1=abc", "t=1700000000", "t=1700000000,t=1700000000,v1=00",
    "t=17e8,v1=00", "t=-1,v1=00", "t=1700000000,v1=ünïcode", "garbage", "t=1," + "v1=0," * 2000])
def test_a_malformed_signature_header_is_false(header):
    assert callbacks.verify(SECRET, header, BODY, now=1_700_000_000) is False


# -- callbacks: where they may go -----------------------------------------------------------

PUBLIC = "93.184.216.34"


def resolver(table: dict[str, list[str]], calls: list | None = None):
    """A getaddrinfo over `table` (host -> addresses, or an exception to raise); IP
    literals resolve to themselves, as with the real one."""
    def resolve(host, port, *args, **kwargs):
        if calls is not None:
            calls.append(host)
        answer = table.get(host, socket.gaierror(socket.EAI_NONAME, "Name or service not known"))
        if isinstance(answer, Exception):
            try:
                return resolve_literal(host, port)
            except ValueError:
                raise answer from None
        return [(socket.AF_INET6 if ":" in a else socket.AF_INET, socket.SOCK_STREAM, 6, "",
                 (a, port)) for a in answer]
    return resolve


def resolve_literal(host: str, port: int):
    import ipaddress
    ip = ipaddress.ip_address(host)
    return [(socket.AF_INET6 if ip.version == 6 else socket.AF_INET, socket.SOCK_STREAM, 6, "",
             (str(ip), port))]


def check(url: str, allowed: list[str], table: dict | None = None) -> None:
    callbacks.check_callback_url(url, allowed, resolve=resolver(
        table if table is not None else {"hooks.example.org": [PUBLIC],
                                         "a.b.example.org": [PUBLIC]}))


@pytest.mark.parametrize(("url", "allowed"), [
    ("https://hooks.example.org/jobs/done?id=1", ["hooks.example.org"]),
    ("https://HOOKS.Example.org./x", ["hooks.example.org"]),
    ("http://hooks.example.org:8080/x", ["hooks.example.org:8080"]),
    ("https://hooks.example.org/x", ["hooks.example.org:443"]),
    ("https://a.b.example.org/x", ["*.example.org"]),
    ("https://hooks.example.org/x", ["other.org", "*.example.org:443"])])
def test_allowed_callback_urls(url, allowed):
    check(url, allowed)
    assert callbacks.callback_target(url, allowed, resolver(
        {"hooks.example.org": [PUBLIC], "a.b.example.org": [PUBLIC]})).addresses == (PUBLIC,)


@pytest.mark.parametrize(("url", "allowed", "words"), [
    ("https://hooks.example.org/x", [], "callbacks are off on this service"),
    ("https://evil.org/x", ["hooks.example.org"], "not among this service's allowed"),
    ("https://example.org/x", ["*.example.org"], "not among"),
    ("https://badexample.org/x", ["*.example.org"], "not among"),
    ("https://hooks.example.org:8443/x", ["hooks.example.org"], None),   # any port: allowed
    ("https://hooks.example.org:8443/x", ["hooks.example.org:443"], "not among"),
    ("http://127.0.0.1/x", ["*.0.0.1"], "not among"),   # a wildcard never covers an IP
    ("https://user:pw@hooks.example.org/x", ["hooks.example.org"], "user name or password"),
    ("https://hooks.example.org@evil.org/x", ["hooks.example.org"], "user name or password"),
    ("ftp://hooks.example.org/x", ["hooks.example.org"], "http or https, not 'ftp'"),
    ("file:///etc/passwd", ["hooks.example.org"], "http or https"),
    ("javascript:alert(1)", ["hooks.example.org"], "http or https"),
    ("hooks.example.org/x", ["hooks.example.org"], "http or https, not ''"),
    ("https:///x", ["hooks.example.org"], "not a host name"),
    ("https://hooks.example.org:99999/x", ["hooks.example.org"], "invalid port"),
    ("https://hooks.example.org:0/x", ["hooks.example.org"], "invalid port"),
    ("https://hooks.example.org/a b", ["hooks.example.org"], "printable ASCII"),
    ("https://hööks.example.org/", ["*.example.org"], "printable ASCII"),
    ("https://hooks.example.org/" + "x" * 2100, ["hooks.example.org"], "at most 2048"),
    ("https://gone.example.org/x", ["*.example.org"], "does not resolve")])
def test_refused_callback_urls(url, allowed, words):
    if words is None:
        check(url, allowed)
        return
    with pytest.raises(InvalidCallback, match=re.escape(words)):
        check(url, allowed)


INTERNAL = ["127.0.0.1", "127.8.9.10", "10.1.2.3", "172.16.0.1", "192.168.1.1",
            "169.254.169.254", "100.64.0.1", "0.0.0.0", "224.0.0.1", "240.0.0.1", "::1", "::",
            "fd00::1", "fe80::1", "ff02::1", "::ffff:127.0.0.1", "::ffff:169.254.169.254",
            "::ffff:10.0.0.1", "2002:a00:1::1", "64:ff9b::a9fe:a9fe"]


@pytest.mark.parametrize("address", INTERNAL)
def test_internal_addresses_only_when_the_host_is_named_exactly(address):
    table = {"hooks.example.org": [PUBLIC, address]}   # any one internal address counts
    with pytest.raises(InvalidCallback, match=re.escape(f"resolves to {address}")):
        check("https://hooks.example.org/x", ["*.example.org"], table)
    check("https://hooks.example.org/x", ["*.example.org", "hooks.example.org"], table)
    literal = f"[{address}]" if ":" in address else address
    with pytest.raises(InvalidCallback, match="not among"):
        check(f"http://{literal}:9000/x", ["*.example.org"], table)
    check(f"http://{literal}:9000/x", [f"{literal}:9000"], table)   # named exactly, as an IP
    assert callbacks.internal_reason(address)


def test_internal_reasons_name_the_kind_of_address():
    assert callbacks.internal_reason("127.0.0.1") == "loopback"
    assert callbacks.internal_reason("169.254.169.254").startswith("link-local (the cloud")
    assert callbacks.internal_reason("10.0.0.1") == "private"
    assert callbacks.internal_reason("100.100.100.200") == "shared (CGNAT, 100.64.0.0/10)"
    assert callbacks.internal_reason("::ffff:127.0.0.1") == \
        "loopback (inside the IPv6 address ::ffff:7f00:1)"
    assert callbacks.internal_reason(PUBLIC) is None
    assert callbacks.internal_reason("2606:4700::1111") is None


def test_an_ipv6_literal_is_compared_in_its_canonical_form():
    table = {}
    check("http://[0:0:0:0:0:0:0:1]:8080/x", ["[::1]:8080"], table)
    check("http://[::1]:8080/x", ["0:0::1"], table)


@pytest.mark.parametrize("entry", ["http://hooks.example.org", "hooks.example.org:http",
                                   "a:b:c", "[::1]x", "hooks.example.org:70000", "*.", ""])
def test_an_allow_list_entry_that_can_never_match_is_a_settings_error(entry):
    with pytest.raises(ValueError, match="allowed callback host"):
        callbacks.check_allowed_hosts([entry])


def test_callback_refusals_are_422_invalid_callback():
    error = InvalidCallback("callbacks are off").api_error()
    assert (error.status, error.code, error.message) == (
        422, "invalid_callback", "callbacks are off")


# -- callbacks: delivery to a real server on 127.0.0.1 --------------------------------------

class Receiver(ThreadingHTTPServer):
    """A callback receiver on 127.0.0.1 that answers with `respond(handler, n)` (n: the
    request's number from 1); it keeps every request, and every exception of its threads."""

    daemon_threads = False   # server_close joins the handlers: none outlives its test

    def __init__(self, respond):
        super().__init__(("127.0.0.1", 0), ReceiverHandler)
        self.respond, self.requests, self.errors = respond, [], []
        self.release = threading.Event()   # ends a handler that holds its connection
        self.url = f"http://127.0.0.1:{self.server_address[1]}"

    def handle_error(self, request, client_address):
        self.errors.append(sys.exc_info()[1])


class ReceiverHandler(BaseHTTPRequestHandler):
    def do_POST(self):
        self.handle_request()

    def do_GET(self):
        self.handle_request()

    def handle_request(self):
        length = int(self.headers.get("Content-Length", 0))
        self.server.requests.append((self.command, self.path, dict(self.headers),
                                     self.rfile.read(length)))
        self.server.respond(self, len(self.server.requests))

    def log_message(self, *args):
        pass


def answer(status: int, **headers):
    def respond(handler, number):
        handler.send_response(status)
        for name, value in headers.items():
            handler.send_header(name, value)
        handler.send_header("Content-Length", "0")
        handler.end_headers()
    return respond


@pytest.fixture
def receiver():
    """Starts receivers; at the end shuts them down and fails the test if one raised."""
    started = []

    def start(respond) -> Receiver:
        server = Receiver(respond)
        thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
        thread.start()
        started.append((server, thread))
        return server

    yield start
    for server, thread in started:
        server.release.set()
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
        assert not thread.is_alive()
    errors = [error for server, _ in started for error in server.errors]
    assert not errors, f"a receiver's thread raised: {errors!r}"


def deliver(url: str, allowed: list[str], **options):
    attempts = []
    options.setdefault("backoff_s", 0.01)
    ok = callbacks.deliver(url, BODY, SECRET, allowed_hosts=allowed,
                           on_attempt=attempts.append, **options)
    return ok, attempts


def test_a_200_gets_one_signed_request(receiver):
    server = receiver(answer(200))
    ok, attempts = deliver(server.url + "/hooks/job?id=j-1", ["127.0.0.1"])
    assert ok is True
    [(method, path, headers, body)] = server.requests
    assert (method, path, body) == ("POST", "/hooks/job?id=j-1", BODY)
    assert headers["Content-Type"] == "application/json"
    assert headers["User-Agent"] == "emotion2vec-serve"
    assert callbacks.verify(SECRET, headers[callbacks.SIGNATURE_HEADER], body, tolerance_s=60)
    [attempt] = attempts
    assert (attempt.status, attempt.error) == (200, None)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", attempt.at)
    assert set(attempt.to_dict()) == {"at", "status", "error", "duration_ms"}


def test_two_500s_then_a_200_is_three_attempts(receiver):
    server = receiver(lambda handler, n: answer(500 if n <= 2 else 200)(handler, n))
    waits = []
    ok, attempts = deliver(server.url, ["127.0.0.1"], backoff_s=0.01,
                           sleep=lambda s: (waits.append(s), time.sleep(s)))
    assert ok is True
    assert [a.status for a in attempts] == [500, 500, 200]
    assert [a.error for a in attempts] == ["HTTP 500", "HTTP 500", None]
    assert waits == [0.01, 0.02]
    assert len(server.requests) == 3
    for _, _, headers, body in server.requests:   # each attempt signed afresh
        assert callbacks.verify(SECRET, headers[callbacks.SIGNATURE_HEADER], body, 60)


def test_the_backoff_doubles_up_to_its_cap_and_attempts_are_bounded(receiver):
    server = receiver(answer(503))
    waits = []
    ok, attempts = deliver(server.url, ["127.0.0.1"], attempts=6, backoff_s=1,
                           max_backoff_s=4, sleep=waits.append)
    assert ok is False
    assert waits == [1, 2, 4, 4, 4]
    assert len(attempts) == len(server.requests) == 6


def test_a_receiver_that_never_answers_costs_timeout_s_an_attempt(receiver):
    server = receiver(lambda handler, n: handler.server.release.wait(timeout=20))
    started = time.monotonic()
    ok, attempts = deliver(server.url, ["127.0.0.1"], attempts=3, timeout_s=0.5)
    assert ok is False
    assert [(a.status, a.error) for a in attempts] == [(None, "timed out after 0.5 s")] * 3
    assert all(450 <= a.duration_ms <= 3000 for a in attempts), attempts
    assert time.monotonic() - started < 10
    assert len(server.requests) == 3


def test_a_receiver_that_trickles_its_answer_is_cut_at_timeout_s(receiver):
    """A byte every 50 ms never trips a per-read timeout; the attempt's deadline cuts it."""
    def trickle(handler, number):
        try:
            for byte in b"HTTP/1.1 200 OK\r\nX-Padding: " + b"x" * 200:
                if handler.server.release.wait(0.05):
                    return
                handler.wfile.write(bytes([byte]))
                handler.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            pass   # the client cut it, as it should
    server = receiver(trickle)
    ok, attempts = deliver(server.url, ["127.0.0.1"], attempts=1, timeout_s=0.5)
    assert ok is False
    [attempt] = attempts
    assert (attempt.status, attempt.error) == (None, "timed out after 0.5 s")
    assert 450 <= attempt.duration_ms <= 3000


def test_a_redirect_is_not_followed(receiver):
    server = receiver(lambda handler, n: answer(
        302 if handler.path == "/hook" else 200, Location="/elsewhere")(handler, n))
    ok, attempts = deliver(server.url + "/hook", ["127.0.0.1"], attempts=2)
    assert ok is False
    assert [(a.status, a.error) for a in attempts] == \
        [(302, "HTTP 302 (a redirect: not followed)")] * 2
    assert [path for _, path, _, _ in server.requests] == ["/hook", "/hook"]


def test_the_url_is_checked_before_every_attempt_and_the_checked_address_is_used(receiver):
    """The host resolves (by a fake resolver) to 127.0.0.1, then to nothing, then again to
    127.0.0.1: the request goes to the address checked, with the URL's Host."""
    server = receiver(lambda handler, n: answer(500 if n == 1 else 200)(handler, n))
    port = server.server_address[1]
    answers = iter([["127.0.0.1"], socket.gaierror(socket.EAI_NONAME, "no such name"),
                    ["127.0.0.1"]])
    calls = []

    def resolve(host, port, *args, **kwargs):
        calls.append(host)
        answer_ = next(answers)
        if isinstance(answer_, Exception):
            raise answer_
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (answer_[0], port))]

    ok, attempts = deliver(f"http://hooks.example.org:{port}/done", ["hooks.example.org"],
                           resolve=resolve)
    assert ok is True
    assert calls == ["hooks.example.org"] * 3
    assert [a.status for a in attempts] == [500, None, 200]
    assert "does not resolve" in attempts[1].error
    assert [headers["Host"] for _, _, headers, _ in server.requests] == \
        [f"hooks.example.org:{port}"] * 2


def test_a_callback_refused_at_delivery_sends_nothing(receiver):
    """Not allowed: one attempt, as DNS cannot change that. Resolving to an internal address
    through a wildcard: every attempt (it could)."""
    server = receiver(answer(200))
    port = server.server_address[1]
    for allowed in (["*.example.org"], ["localhost"], []):
        ok, attempts = deliver(server.url, allowed, attempts=3)
        assert ok is False
        [attempt] = attempts
        assert attempt.status is None and ("not among" in attempt.error or
                                           "callbacks are off" in attempt.error)
    ok, attempts = deliver(f"http://hooks.example.org:{port}/", ["*.example.org"], attempts=3,
                           resolve=resolver({"hooks.example.org": ["127.0.0.1"]}))
    assert ok is False
    assert [a.error for a in attempts] == [
        "callback host hooks.example.org resolves to 127.0.0.1, loopback: allowed only when "
        "the allowed callback hosts name it exactly"] * 3
    assert server.requests == []


def test_nothing_listening_is_a_failed_attempt():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    ok, attempts = deliver(f"http://127.0.0.1:{port}/", ["127.0.0.1"], attempts=2)
    assert ok is False
    assert all(a.status is None and a.error.startswith("ConnectionRefusedError")
               for a in attempts)


def self_signed(tmp_path: Path, host: str) -> tuple[Path, Path]:
    """A certificate for `host` and its key, the certificate its own authority."""
    x509 = pytest.importorskip("cryptography.x509")
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, host)])
    now = datetime.now(UTC)
    certificate = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - timedelta(minutes=5))
                   .not_valid_after(now + timedelta(hours=1))
                   .add_extension(x509.SubjectAlternativeName([x509.DNSName(host)]), False)
                   .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
                   .sign(key, hashes.SHA256()))
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def test_https_goes_to_the_checked_address_with_the_url_host_verified(receiver, tmp_path,
                                                                     monkeypatch):
    """TLS to 127.0.0.1 (as the fake resolver says) for hooks.example.org: the certificate
    is checked against the URL's host, not the address."""
    cert_path, key_path = self_signed(tmp_path, "hooks.example.org")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_path, key_path)
    server = receiver(answer(200))
    server.socket = context.wrap_socket(server.socket, server_side=True)
    port = server.server_address[1]
    monkeypatch.setenv("SSL_CERT_FILE", str(cert_path))   # the certificate as an authority
    resolve = resolver({"hooks.example.org": ["127.0.0.1"], "other.example.org": ["127.0.0.1"]})
    allowed = ["hooks.example.org", "other.example.org"]
    ok, attempts = deliver(f"https://hooks.example.org:{port}/done", allowed, resolve=resolve)
    assert ok is True and attempts[0].status == 200
    [(_, path, headers, _)] = server.requests
    assert (path, headers["Host"]) == ("/done", f"hooks.example.org:{port}")
    ok, attempts = deliver(f"https://other.example.org:{port}/done", allowed, attempts=1,
                           resolve=resolve)
    assert ok is False and attempts[0].error.startswith("SSLCertVerificationError")
    assert len(server.requests) == 1
