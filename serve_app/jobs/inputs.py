"""What a job may read, and reading it: local paths and filesystem URIs (`s3://`, `gs://`,
`file://`, through pyarrow's filesystems), checked against the operator's allow-list
(`jobs.allow_inputs`) at submission and again, file by file, when the job lists them (a link
inside an allowed folder that points out of it is refused then). No Ray, no torch."""

from __future__ import annotations

import os
import posixpath
from pathlib import Path
from urllib.parse import unquote, urlsplit

from serve_app.errors import ApiError

MAX_INPUT_CHARS = 4096


def _is_uri(text: str) -> bool:
    return "://" in text


def _local(text: str) -> str | None:
    """The local path a plain path or a file:// URI names (resolved: links followed), or None
    for a remote URI."""
    if _is_uri(text):
        parts = urlsplit(text)
        if parts.scheme != "file":
            return None
        text = unquote(parts.path)
    return os.path.realpath(os.path.expanduser(text))


def _remote(text: str) -> str:
    """A remote URI with its path normalised (no `..` tricks), as compared with prefixes."""
    parts = urlsplit(text)
    path = posixpath.normpath(unquote(parts.path) or "/")
    return f"{parts.scheme}://{parts.netloc}{'' if path == '/' else path}"


def allowed(text: str, allow: list[str]) -> bool:
    """Whether an input (a path or URI) lies under one of the allow-list's prefixes."""
    local = _local(text)
    for prefix in allow:
        prefix_local = _local(prefix)
        if local is not None and prefix_local is not None:
            if local == prefix_local or local.startswith(prefix_local.rstrip("/") + "/"):
                return True
        elif local is None and prefix_local is None:
            base = _remote(prefix).rstrip("/")
            target = _remote(text)
            if target == base or target.startswith(base + "/"):
                return True
    return False


def check_inputs(inputs: list[str], allow: list[str]) -> None:
    """403 input_not_allowed for an input outside the allow-list (naming it), 422 for one
    that is not a path or URI at all."""
    for text in inputs:
        if not text or len(text) > MAX_INPUT_CHARS or "\x00" in text:
            raise ApiError(422, "invalid_input", f"not a path or URI: {text[:80]!r}")
        if _is_uri(text) and not urlsplit(text).scheme.isalnum():
            raise ApiError(422, "invalid_input", f"not a URI: {text[:80]!r}")
        if not allowed(text, allow):
            where = ", ".join(allow) if allow else "nothing: only uploaded archives"
            raise ApiError(403, "input_not_allowed", f"{text[:200]!r} is outside what jobs "
                           f"may read here ({where}); the operator sets jobs.allow_inputs")


def list_inputs(inputs: list[str], allow: list[str], suffixes: set[str]
                ) -> tuple[list[str], list[str]]:
    """(the audio files the inputs name, in order, each once; the files refused because they
    resolve outside the allow-list). Folders are searched for audio by suffix; a file named
    directly is taken whatever its name. FileNotFoundError for an input that is not there."""
    from serve_app.tools.client import expand

    files: list[str] = []
    refused: list[str] = []
    for text in inputs:
        local = _local(text)
        found = [str(path.resolve()) for path in expand([local])] if local is not None \
            else _list_remote(text, suffixes)
        for name in found:
            (files if allowed(name, allow) else refused).append(name)
    return list(dict.fromkeys(files)), refused


def _list_remote(uri: str, suffixes: set[str]) -> list[str]:
    from pyarrow import fs

    filesystem, path = fs.FileSystem.from_uri(uri)
    info = filesystem.get_file_info(path)
    if info.type == fs.FileType.NotFound:
        raise FileNotFoundError(f"no such file or folder: {uri}")
    scheme = uri.split("://", 1)[0]
    if info.type == fs.FileType.File:
        return [uri]
    entries = filesystem.get_file_info(fs.FileSelector(path, recursive=True))
    return sorted(f"{scheme}://{entry.path}" for entry in entries
                  if entry.type == fs.FileType.File
                  and Path(entry.base_name).suffix.lower() in suffixes)


def source_size(name: str) -> int:
    """A file's size in bytes, local or a URI."""
    if not _is_uri(name):
        return os.stat(name).st_size
    from pyarrow import fs

    filesystem, path = fs.FileSystem.from_uri(name)
    info = filesystem.get_file_info(path)
    if info.type != fs.FileType.File:
        raise FileNotFoundError(f"no such file: {name}")
    return info.size


def read_source(name: str) -> bytes:
    """A file's bytes, local or a URI."""
    if not _is_uri(name):
        return Path(name).read_bytes()
    from pyarrow import fs

    filesystem, path = fs.FileSystem.from_uri(name)
    with filesystem.open_input_stream(path) as stream:
        return stream.read()
