"""Where the testbed keeps what it builds, and how it writes there without leaving half-files.

Everything the testbed makes (corpus text, tokenizer, trained models) lives under one user cache
directory: `$MOEPRUNE_CACHE` if set, else `~/.cache/moeprune`. Each artefact is built in a
temporary sibling and renamed into place, so a killed build never leaves something that looks
finished; the presence of the final path is the "done" marker.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

ENV_VAR = "MOEPRUNE_CACHE"


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """The cache directory: `cache_dir` if given, else `$MOEPRUNE_CACHE`, else `~/.cache/moeprune`."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "moeprune"


def stable_hash(obj: object, n: int = 12) -> str:
    """A short hex digest of a JSON-able object, independent of dict order and of the process."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:n]


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` through a temporary file in the same directory, then rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)  # mkstemp makes files private; these are ordinary shared outputs
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


@contextlib.contextmanager
def building_dir(final: Path) -> Iterator[Path]:
    """Yield a fresh temporary directory that becomes `final` when the block exits cleanly.

    If another process finished `final` first, its result is kept and ours is dropped: both were
    built from the same inputs, so either is correct.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield tmp
        finish_dir(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def finish_dir(tmp: Path, final: Path, *, replace: bool = False) -> None:
    """Rename the built directory `tmp` to `final`, readable like any other output.

    Without `replace`, a `final` another process finished first is kept (same inputs, so either is
    correct) and `tmp` stays for the caller to remove; with it, an older `final` is removed first.
    """
    # mkdtemp makes the directory private, and some writers (safetensors) make private files.
    os.chmod(tmp, 0o755)
    for f in tmp.iterdir():
        if f.is_file():
            os.chmod(f, 0o644)
    if replace and final.exists():
        shutil.rmtree(final)
    try:
        os.rename(tmp, final)
    except OSError:
        if not final.exists():
            raise
