"""Where outputs go: every check before any work, and the atomic write at the end.

The rules, which hold with or without `--force`:
- an output path is never empty, never the current directory or one of its parents;
- no output overlaps an input (model, calibration source, stats, plan, tokenizer, offload dir), nor
  another output, in either direction;
- `--force` replaces only what moeprune itself wrote (a directory recognised by its plan, stats,
  sweep or analysis file; a JSON file recognised by its content) or an empty directory;
- the output's parent is writable and has room, checked before the expensive pass;
- everything is written into a temporary sibling (`.NAME.tmp-XXXX`, holding the marker file
  `TEMP_MARKER` with the writer's pid) and renamed into place at the end. A run killed with
  SIGKILL leaves that sibling behind; the next run writing to the same place removes it and says so.
- outputs get the usual permissions (what `umask` allows), not `mkdtemp`'s private 0700.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

from moeprune.errors import MoepruneError

TEMP_MARKER = ".moeprune-partial"  # inside every temporary output directory: {"pid": ...}
# Files that only a moeprune output directory holds (checkpoint, stats, sweep); analysis: summary.json + keys.
OWN_DIR_FILES = ("moeprune_plan.json", "stats.json", "sweep.json")
Notify = Callable[[str], None] | None


def _umask() -> int:
    # os.umask can only be read by setting it; set it back at once (nothing else runs in between)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _resolved(path: str | Path) -> Path:
    return Path(os.path.abspath(os.path.expanduser(str(path))))


def _check_named(path: str | Path | None, what: str) -> Path:
    if path is None or not str(path).strip():
        raise MoepruneError(
            f"{what} is empty; give the path to write (an unset shell variable gives an empty one)"
        )
    p = _resolved(path)
    cwd = _resolved(os.getcwd())
    if cwd == p or cwd.is_relative_to(p):
        raise MoepruneError(
            f"{what} {path} is the current directory or one of its parents; give a new directory"
        )
    if p.parent == p:
        raise MoepruneError(f"{what} {path} is the root directory; give a new directory")
    return p


def check_separate(inputs: Mapping[str, str | Path | None], outputs: Mapping[str, str | Path | None]) -> None:
    """No output inside an input or around it, and no two outputs inside each other.

    Keys name the option (`--calib`, `model`), values are paths; None and `hf:` sources are skipped.
    """
    def real(items):
        return [(k, str(v), _resolved(v)) for k, v in items.items()
                if v is not None and str(v).strip() and not str(v).startswith("hf:")]

    ins, outs = real(inputs), real(outputs)
    for o_name, o_raw, o in outs:
        for i_name, i_raw, i in ins:
            if o == i or o.is_relative_to(i) or i.is_relative_to(o):
                raise MoepruneError(
                    f"{o_name} {o_raw} overlaps the input {i_name} {i_raw}: an output may not be, "
                    f"contain or sit inside an input; choose another {o_name}"
                )
    for n, (a_name, a_raw, a) in enumerate(outs):
        for b_name, b_raw, b in outs[n + 1:]:
            if a == b or a.is_relative_to(b) or b.is_relative_to(a):
                raise MoepruneError(
                    f"{a_name} {a_raw} and {b_name} {b_raw} overlap; give them separate paths"
                )


def is_moeprune_directory(path: Path) -> bool:
    """Whether `path` holds a moeprune output: a checkpoint, stats, sweep or analysis directory."""
    if any((path / f).is_file() for f in OWN_DIR_FILES):
        return True
    summary = path / "summary.json"
    if summary.is_file():  # `moeprune analyze`: summary.json with its own keys beside layer_NNN.json
        with contextlib.suppress(OSError, ValueError):
            d = json.loads(summary.read_text())
            return isinstance(d, dict) and {"representation", "linkage", "layers"} <= set(d)
    return False


def _is_moeprune_file(path: Path) -> bool:
    """A JSON file moeprune writes: a plan (method, layers, version) or a report (`written_by: moeprune`)."""
    try:
        if path.stat().st_size > 256 * 1024**2:
            return False
        d = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(d, dict):
        return False
    return str(d.get("written_by", "")).startswith("moeprune") or {
        "method", "layers", "version", "model",
    } <= set(d)


def _existing_ancestor(p: Path) -> Path:
    q = p
    while not q.exists():
        q = q.parent
    return q


def _check_writable(p: Path, what: str, raw: str | Path, expected_bytes: int | None) -> None:
    """The nearest existing ancestor of `p` is a writable directory with room for `expected_bytes`.

    A probe directory named like the temporary sibling is made and removed, which also catches
    read-only mounts, immutable directories and names too long for the sibling.
    """
    base = _existing_ancestor(p.parent)
    if not base.is_dir():
        raise MoepruneError(f"{what} {raw}: {base} is a file, not a directory; choose another {what}")
    if not os.access(base, os.W_OK | os.X_OK):
        raise MoepruneError(f"{what} {raw}: {base} is not writable; choose a directory you can write to")
    if base == p.parent:
        try:
            probe = Path(tempfile.mkdtemp(prefix=f".{p.name}.tmp-", dir=base))
            probe.rmdir()
        except OSError as e:
            raise MoepruneError(
                f"{what} {raw}: cannot create files in {base} ({e.strerror}); choose another {what}"
            )
    if expected_bytes:
        free = shutil.disk_usage(base).free
        if free < expected_bytes:
            gib = 1024**3
            raise MoepruneError(
                f"{what} {raw}: {base} has {free / gib:.2f} GiB free but the output needs at least "
                f"{expected_bytes / gib:.2f} GiB; free space or choose another {what}"
            )


def remove_stale_temporaries(p: Path, notify: Notify = None) -> list[Path]:
    """Remove `.NAME.tmp-*` / `.NAME.old-*` siblings of `p` left by a killed moeprune run (marker, dead
    pid)."""
    removed = []
    if not p.parent.is_dir():
        return removed
    for pattern in (f".{p.name}.tmp-*", f".{p.name}.old-*"):
        for q in p.parent.glob(pattern):
            marker = q / TEMP_MARKER
            if not q.is_dir() or q.is_symlink() or not marker.is_file():
                continue
            try:
                pid = int(json.loads(marker.read_text()).get("pid", 0))
            except (OSError, ValueError, AttributeError):
                continue
            if pid > 0 and pid != os.getpid() and _alive(pid):
                continue  # another run is writing there right now
            shutil.rmtree(q, ignore_errors=True)
            removed.append(q)
            if notify is not None:
                notify(f"removed {q}, a temporary directory left by an interrupted moeprune run (pid {pid})")
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def check_output_dir(
    out: str | Path | None, force: bool, inputs: Mapping[str, str | Path | None] | tuple = (), *,
    what: str = "--out", expected_bytes: int | None = None, notify: Notify = None,
) -> Path:
    """All checks of an output directory, before any work; returns its absolute path.

    `inputs` maps option names to input paths (a tuple of paths is read as model inputs).
    """
    p = _check_named(out, what)
    if isinstance(inputs, tuple):
        inputs = {f"input {i + 1}" if len(inputs) > 1 else "model": v for i, v in enumerate(inputs)}
    check_separate(inputs, {what: out})
    if p.exists() or p.is_symlink():
        if p.is_symlink() or not p.is_dir():
            raise MoepruneError(
                f"{what} {out} exists and is not a directory; moeprune replaces only directories "
                f"it wrote: choose another {what}"
            )
        entries = sorted(e.name for e in p.iterdir())
        if entries and not force:
            raise MoepruneError(f"{what} {out} already exists and is not empty; pass --force to replace it "
                                "(only a directory moeprune wrote is replaced)")
        if entries and not is_moeprune_directory(p):
            shown = ", ".join(entries[:3]) + (f" and {len(entries) - 3} more" if len(entries) > 3 else "")
            raise MoepruneError(
                f"{what} {out} holds files moeprune did not write ({shown}); --force replaces only "
                f"a moeprune output or an empty directory: choose another {what}"
            )
    _check_writable(p, what, out, expected_bytes)
    remove_stale_temporaries(p, notify)
    return p


def check_output_file(out: str | Path | None, force: bool, inputs: Mapping[str, str | Path | None] = {},
                      *, what: str = "--out") -> Path:
    """All checks of a single output file (a plan, a JSON report), before any work."""
    p = _check_named(out, what)
    check_separate(inputs, {what: out})
    if p.is_dir():
        raise MoepruneError(f"{what} {out} is a directory; give a file name, e.g. {Path(out) / 'out.json'}")
    if not p.parent.is_dir():
        raise MoepruneError(
            f"{what} {out}: its directory {p.parent} does not exist; create it or choose another path"
        )
    if p.exists() or p.is_symlink():
        if not force:
            raise MoepruneError(f"{what} {out} already exists; pass --force to replace it")
        if p.is_symlink() or not _is_moeprune_file(p):
            raise MoepruneError(
                f"{what} {out} is not a file moeprune wrote; --force replaces only moeprune's own "
                f"plans and reports: choose another {what}"
            )
    _check_writable(p, what, out, None)
    return p


def _open_permissions(root: Path) -> None:
    """Give a finished output the permissions `save_pretrained` would (umask), not mkdtemp's 0700."""
    mask = _umask()
    for d, _dirs, files in os.walk(root):
        os.chmod(d, 0o777 & ~mask)
        for f in files:
            os.chmod(os.path.join(d, f), 0o666 & ~mask)


@contextlib.contextmanager
def atomic_directory(out: str | Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary directory next to `out`; on success it replaces `out` in one rename.

    Any exception or signal turned into one (SIGINT, SIGTERM: see `moeprune.runtime`) removes the
    temporary directory. Replacing an existing `out` needs `force` and a moeprune-written or empty `out`.
    """
    o = _resolved(out)
    o.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{o.name}.tmp-", dir=o.parent))
    try:
        (tmp / TEMP_MARKER).write_text(json.dumps({"pid": os.getpid()}))
        yield tmp
        (tmp / TEMP_MARKER).unlink()
        _open_permissions(tmp)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        failure = _write_failure(e, out)
        if failure is not None:
            raise failure from e
        raise
    old = None
    if o.exists():
        entries = o.is_dir() and any(o.iterdir())
        if not o.is_dir() or (entries and not (force and is_moeprune_directory(o))):
            shutil.rmtree(tmp, ignore_errors=True)
            raise MoepruneError(
                f"output {out} appeared while working and is not a moeprune output to replace; "
                "the result was not kept: choose another --out"
            )
        old = o.parent / f".{o.name}.old-{os.getpid()}"
        o.rename(old)
        # a kill now leaves a removable sibling
        (old / TEMP_MARKER).write_text(json.dumps({"pid": os.getpid()}))
    tmp.rename(o)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_file_atomically(path: str | Path, write: Callable[[Path], None]) -> None:
    """`write(tmp)` a sibling temporary file, then rename it onto `path`: a failure leaves no half file."""
    p = _resolved(path)
    fd, name = tempfile.mkstemp(prefix=f".{p.name}.tmp-", dir=p.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        tmp.replace(p)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        failure = _write_failure(e, path)
        if failure is not None:
            raise failure from e
        raise


def _write_failure(e: BaseException, out: str | Path) -> MoepruneError | None:
    """The one-line error for a write that failed for lack of room or rights (the OS's or safetensors'
    error)."""
    if isinstance(e, OSError) and e.errno is not None:
        reason = e.strerror or str(e)
    elif type(e).__name__ == "SafetensorError" and "I/O error" in str(e):  # safetensors wraps the OS error
        reason = str(e).split("I/O error:", 1)[-1].strip()
    else:
        return None
    return MoepruneError(
        f"could not write {out} ({reason}); nothing was written: free space or choose another place"
    )


def check_offload_dir(offload_dir: str | Path | None, inputs: dict) -> None:
    """--offload-dir is a writable directory (or can be made) outside every input."""
    if offload_dir is None:
        return
    import os

    if not str(offload_dir).strip():
        raise MoepruneError(
            "--offload-dir is empty; give a directory for spilled hidden states, or leave it out"
        )
    check_separate(inputs, {"--offload-dir": offload_dir})
    p = Path(offload_dir)
    base = p
    while not base.exists():
        base = base.parent
    if not base.is_dir():
        raise MoepruneError(
            f"--offload-dir {offload_dir}: {base} is a file, not a directory; choose a directory"
        )
    if not os.access(base, os.W_OK | os.X_OK):
        raise MoepruneError(
            f"--offload-dir {offload_dir}: {base} is not writable; choose a directory you can write to"
        )
