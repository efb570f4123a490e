"""Where shards, caches and run folders live: a local path or an ``s3://bucket/prefix`` URL.

Every file the project reads or writes outside a temp folder goes through these calls, so local
paths and object storage behave the same: ``exists`` / ``is_dir`` / ``size`` / ``listdir`` /
``walk``, ``read_bytes`` / ``open_read``, and writes that are atomic on both (``write_bytes``,
``write_json``, ``put_file``: a local file is written to ``NAME.tmp`` and renamed; an object is
uploaded from a finished local temp file, and S3 shows an object only once its upload
completes, so a killed writer leaves no partial object).

Object storage is reached through ``pyarrow.fs`` (the filesystem Ray Train uses for ``s3://``
storage paths). The endpoint and credentials come from the environment, never from a config
file: ``AWS_ENDPOINT_URL`` (an S3-compatible server, e.g. ``http://127.0.0.1:9000``),
``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` (or the usual AWS credential chain) and
``AWS_DEFAULT_REGION``. ``worker_env()`` is that part of the environment, handed to Ray workers.

WebDataset opens ``s3://`` shard urls through ``open_read`` (a ``gopen`` scheme registered here).
A run folder on object storage is worked on in a local temp copy (``staging_dir``) that a
``Mirror`` pulls at the start and pushes after each checkpoint and at the end.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

SCHEMES = ("s3://",)
ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
       "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION", "AWS_REGION")  # fmt: skip
_FILESYSTEMS: dict[tuple, object] = {}


def is_remote(path) -> bool:
    return isinstance(path, str) and path.startswith(SCHEMES)


def join(base, *parts: str) -> str:
    """``base/part/...`` as a string (a URL stays a URL; ``Path`` would fold its ``//``)."""
    if not is_remote(base):
        return str(Path(base).expanduser().joinpath(*parts))
    return "/".join([str(base).rstrip("/"), *(p.strip("/") for p in parts)])


def child(base, *parts: str) -> Path | str:
    """``join``, but a local ``Path`` for a local ``base`` (a URL stays a string)."""
    return join(base, *parts) if is_remote(base) else Path(base).expanduser().joinpath(*parts)


def name(url) -> str:
    return str(url).rstrip("/").rsplit("/", 1)[-1]


def parent(url) -> str:
    return str(url).rstrip("/").rsplit("/", 1)[0] if is_remote(url) else str(Path(url).parent)


# ---------------------------------------------------------------- object storage


def _remote(url: str):
    """``(pyarrow filesystem, "bucket/key")``; one filesystem per bucket and process."""
    import pyarrow.fs

    scheme, rest = url.split("://", 1)
    bucket = rest.split("/", 1)[0]
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3", os.environ.get("AWS_ENDPOINT_URL"))
    key = (scheme, bucket, endpoint, os.getpid())  # no client shared across a fork
    if key not in _FILESYSTEMS:
        _FILESYSTEMS[key] = pyarrow.fs.FileSystem.from_uri(f"{scheme}://{bucket}")[0]
    return _FILESYSTEMS[key], rest.rstrip("/")


def _info(url: str):
    fs, path = _remote(url)
    return fs.get_file_info(path)


def _type(url) -> str:
    """``"file"``, ``"dir"`` or ``"none"``."""
    if is_remote(url):
        import pyarrow.fs

        kind = _info(url).type
        return {pyarrow.fs.FileType.File: "file", pyarrow.fs.FileType.Directory: "dir"}.get(
            kind, "none"
        )
    path = Path(url).expanduser()
    return "file" if path.is_file() else "dir" if path.is_dir() else "none"


# ---------------------------------------------------------------- queries


def exists(url) -> bool:
    return _type(url) != "none"


def is_file(url) -> bool:
    return _type(url) == "file"


def is_dir(url) -> bool:
    return _type(url) == "dir"


def size(url) -> int | None:
    """Bytes of a file; None when ``url`` is not a file here (or a stream such as ``pipe:``)."""
    if is_remote(url):
        import pyarrow.fs

        info = _info(url)
        return info.size if info.type == pyarrow.fs.FileType.File else None
    path = Path(url).expanduser()
    return path.stat().st_size if path.is_file() else None


def walk(url) -> list[str]:
    """Every file under folder ``url``, as sorted paths relative to it ([] if none)."""
    if is_remote(url):
        import pyarrow.fs

        fs, path = _remote(url)
        selector = pyarrow.fs.FileSelector(path, recursive=True, allow_not_found=True)
        infos = fs.get_file_info(selector)
        files = [i.path[len(path) + 1 :] for i in infos if i.type == pyarrow.fs.FileType.File]
        return sorted(files)
    root = Path(url).expanduser()
    if not root.is_dir():
        return []
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def listdir(url) -> list[str]:
    """Names directly under folder ``url`` (files and folders), sorted ([] if none)."""
    if is_remote(url):
        return sorted({rel.split("/", 1)[0] for rel in walk(url)})
    root = Path(url).expanduser()
    return sorted(p.name for p in root.iterdir()) if root.is_dir() else []


# ---------------------------------------------------------------- reading


def open_read(url):
    """A binary stream of the file (sequential reads)."""
    if is_remote(url):
        fs, path = _remote(url)
        return fs.open_input_stream(path)
    return open(Path(url).expanduser(), "rb")


def read_bytes(url) -> bytes:
    with open_read(url) as f:
        return f.read()


def read_json(url) -> dict | None:
    """The JSON file's content; None when it does not exist."""
    try:
        return json.loads(read_bytes(url))
    except FileNotFoundError:
        return None


def sha256(url) -> str:
    h = hashlib.sha256()
    with open_read(url) as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def get_file(url, local: Path) -> None:
    local.parent.mkdir(parents=True, exist_ok=True)
    with open_read(url) as src, open(local, "wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)


# ---------------------------------------------------------------- writing (atomic)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def put_file(local: Path, url) -> None:
    """Copy finished local file ``local`` to ``url``: an upload (the object appears when it
    completes) or a copy into ``url.tmp`` + rename."""
    if is_remote(url):
        fs, path = _remote(url)
        with open(local, "rb") as src, fs.open_output_stream(path) as dst:
            shutil.copyfileobj(src, dst, 8 << 20)
        return
    with open(local, "rb") as src, atomic_local(url) as dst:
        shutil.copyfileobj(src, dst, 1 << 20)


@contextlib.contextmanager
def atomic_local(path) -> Iterator:
    """A binary file at ``path.tmp``: on a clean exit fsynced and renamed to ``path``, on an
    exception removed."""
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)
    fsync_dir(path.parent)


def write_bytes(url, data: bytes) -> None:
    if is_remote(url):
        fs, path = _remote(url)
        with fs.open_output_stream(path) as dst:  # one complete body: all or nothing
            dst.write(data)
        return
    with atomic_local(url) as f:
        f.write(data)


def write_json(url, obj) -> None:
    write_bytes(url, json.dumps(obj, indent=1, sort_keys=True).encode())


def remove(url) -> None:
    """Delete a file (no error when it is gone)."""
    if is_remote(url):
        fs, path = _remote(url)
        with contextlib.suppress(FileNotFoundError):
            fs.delete_file(path)
        return
    Path(url).expanduser().unlink(missing_ok=True)


def temp_file(suffix: str = "") -> Path:
    """A new empty file in the temp folder (the caller removes it)."""
    fd, path = tempfile.mkstemp(prefix="distsr-", suffix=suffix)
    os.close(fd)
    return Path(path)


# ---------------------------------------------------------------- workers, WebDataset


def worker_env() -> dict[str, str]:
    """The object-storage settings of this process's environment, for Ray workers started
    before they were set (a cluster's nodes may have their own instead)."""
    return {k: os.environ[k] for k in ENV if k in os.environ}


def _gopen(url, mode="rb", bufsize=8192, **kw):
    if mode != "rb":
        raise ValueError(f"{url}: shards on object storage are written with storage.put_file")
    return open_read(url)


def register_webdataset() -> None:
    """Let WebDataset read ``s3://`` shard urls (``webdataset.gopen`` dispatches on the scheme)."""
    gopen = sys.modules["webdataset.gopen"]  # the module (the package exports the function)
    for scheme in SCHEMES:
        gopen.gopen_schemes[scheme.split(":", 1)[0]] = _gopen


# ---------------------------------------------------------------- run folders


def staging_dir(url: str) -> Path:
    """The local temp copy of remote run folder ``url`` for this process."""
    digest = hashlib.sha256(url.encode()).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / f"distsr-run-{os.getpid()}-{digest}" / name(url)


class Mirror:
    """Keeps remote folder ``url`` equal to local folder ``local`` for the files this process
    wrote: ``pull`` downloads the remote files (but those ``skip`` names at the top level), and
    ``push`` uploads the files that changed since and deletes the remote files that were pulled
    or pushed and are gone locally. ``last`` names are uploaded after the other files (a
    checkpoint's completeness marker). Files starting with ``.tmp`` are never pushed."""

    def __init__(self, local: Path, url: str, skip=(), last=()):
        self.local, self.url, self.skip, self.last = Path(local), url, tuple(skip), tuple(last)
        self.known: dict[str, tuple] = {}  # relative path -> (size, mtime_ns) when in sync

    def _skipped(self, rel: str) -> bool:
        top = rel.split("/", 1)[0]
        return any(Path(top).match(pattern) for pattern in self.skip)

    def pull(self) -> list[str]:
        got = [rel for rel in walk(self.url) if not self._skipped(rel)]
        for rel in got:
            get_file(join(self.url, rel), self.local / rel)
            self.known[rel] = self._stat(rel)
        return got

    def _stat(self, rel: str) -> tuple:
        st = (self.local / rel).stat()
        return st.st_size, st.st_mtime_ns

    def push(self) -> list[str]:
        now = {rel: self._stat(rel) for rel in walk(self.local)
               if not any(p.startswith(".tmp") for p in rel.split("/"))}  # fmt: skip
        changed = [rel for rel, st in now.items() if self.known.get(rel) != st]
        changed.sort(key=lambda rel: (name(rel) in self.last, rel))
        for rel in changed:
            put_file(self.local / rel, join(self.url, rel))
            self.known[rel] = now[rel]
        for rel in [rel for rel in self.known if rel not in now]:
            remove(join(self.url, rel))
            del self.known[rel]
        return changed
