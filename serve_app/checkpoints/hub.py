"""Hub ids -> a local model directory, which then loads like any local directory.

`iic/emotion2vec_plus_large` (ModelScope, `hub: ms`) or `emotion2vec/emotion2vec_plus_large`
(Hugging Face, `hub: hf`): the hub client's own offline lookup comes first (its cache layout
and settings: MODELSCOPE_CACHE; HF_HOME, HF_HUB_CACHE), with no network at all when the
snapshot is there. Only when it is not is a download tried, in a child process that is killed
after `timeout_s`, with the clients' retries cut short: without network a replica fails in
seconds, and a stalled download never holds it past the bound. Either way the error says what
to do.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

from serve_app.checkpoints.weights import model_files
from serve_app.errors import ModelLoadError

logger = logging.getLogger(__name__)

HUB_NAMES = {"ms": "ModelScope", "hf": "Hugging Face"}

# The download child: the client's snapshot_download, printing the directory it returns.
_SNAPSHOT = {
    "ms": "from modelscope.hub.snapshot_download import snapshot_download",
    "hf": "from huggingface_hub import snapshot_download",
}
_DOWNLOAD_CODE = ("import sys\n{import_line}\n"
                  "print(snapshot_download(sys.argv[1], revision=sys.argv[2] or None))")

# Defaults for the download child (the deployer's environment wins): fail fast when the hub
# cannot be reached instead of retrying with back-off (about 22 s here for ModelScope).
CLIENT_LIMITS = {
    "MODELSCOPE_API_MAX_RETRIES": "2",
    "MODELSCOPE_REPO_TREE_PAGE_MAX_ATTEMPTS": "2",
    "MODELSCOPE_API_CONNECT_TIMEOUT": "10",
    "HF_HUB_ETAG_TIMEOUT": "10",
    "HF_HUB_DOWNLOAD_TIMEOUT": "30",
}

_PREFILL = {
    "ms": "`modelscope download --model {id}` with MODELSCOPE_CACHE as the replicas see it",
    "hf": "`hf download {id}` with HF_HOME (or HF_HUB_CACHE) as the replicas see it",
}


def _complete(directory: Path) -> bool:
    return not model_files(directory).missing()


def cached_snapshot(repo_id: str, hub: str, revision: str | None) -> Path | None:
    """The hub client's cached snapshot of `repo_id`, found without any network; None when the
    cache lacks it (or holds only part of it)."""
    if hub == "ms":
        from modelscope.hub.snapshot_download import snapshot_download
    else:
        from huggingface_hub import snapshot_download
    try:
        found = Path(snapshot_download(repo_id, revision=revision, local_files_only=True))
    except Exception as exc:  # the clients raise their own "not cached" errors
        logger.info("%s is not in the %s cache: %s", repo_id, HUB_NAMES[hub], exc)
        return None
    return found if _complete(found) else None


def download(repo_id: str, hub: str, revision: str | None, timeout_s: float) -> Path:
    """Download with the hub client in a child process, killed after `timeout_s`."""
    code = _DOWNLOAD_CODE.format(import_line=_SNAPSHOT[hub])
    child = subprocess.Popen(
        [sys.executable, "-c", code, repo_id, revision or ""],
        env={**CLIENT_LIMITS, **os.environ}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, start_new_session=True)
    try:
        out, err = child.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):  # it may have just ended
            os.killpg(child.pid, signal.SIGKILL)
        child.communicate()
        raise _not_available(repo_id, hub,
                             f"it was not downloaded within {timeout_s:g} s") from None
    lines = out.strip().splitlines()
    if child.returncode != 0 or not lines:
        reason = (err.strip().splitlines() or [f"exit status {child.returncode}"])[-1]
        raise _not_available(repo_id, hub, f"the download failed: {reason[:400].rstrip('.')}")
    directory = Path(lines[-1])
    if not directory.is_dir() or not _complete(directory):
        raise _not_available(repo_id, hub, f"the download gave {directory}, which lacks "
                                           f"{', '.join(model_files(directory).missing())}")
    return directory


def resolve(repo_id: str, hub: str, revision: str | None, timeout_s: float) -> Path:
    """A complete local directory for a hub id: the cached snapshot, or a bounded download."""
    cached = cached_snapshot(repo_id, hub, revision)
    if cached is not None:
        logger.info("%s: using the %s cache at %s", repo_id, HUB_NAMES[hub], cached)
        return cached
    logger.warning("%s is not in the %s cache: downloading (at most %g s)", repo_id,
                   HUB_NAMES[hub], timeout_s)
    return download(repo_id, hub, revision, timeout_s)


def _not_available(repo_id: str, hub: str, reason: str) -> ModelLoadError:
    return ModelLoadError(
        f"{repo_id} is not in the {HUB_NAMES[hub]} cache of this node and {reason}. "
        f"Pre-fill the cache ({_PREFILL[hub].format(id=repo_id)}), or set `source` to a local "
        "directory holding config.yaml, model.pt and tokens.txt")
