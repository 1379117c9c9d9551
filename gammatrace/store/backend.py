"""Run folders on object storage: an fsspec file system behind :class:`~gammatrace.store.run.RunStore`.

A store location is a local folder (a path, or a ``file://`` URL) or a URL of any
fsspec file system (``s3://bucket/study``, ``gs://…``, ``memory://…``); the local case
keeps the store's own code (temporary file + rename, an ``fcntl`` lock). On object
storage the same contract is kept another way:

* **atomic writes**: one PUT per file (a large file: one multipart upload, which becomes
  visible only when it completes), so a reader sees the old object or the new one;
* **the lock** is an object ``.lock`` created with a conditional PUT (``If-None-Match: *``)
  that holds its holder (host, PID) and an expiry; the holder renews it while it lives
  (``If-Match`` on its own version where the store supports it, as S3 does). A lock whose
  expiry has passed, or whose holder is a dead process on this host, is taken over;
* **confinement** compares URL prefixes: a name below the folder never leaves it.

Locally, every file the tool writes into an output folder (run files, reports, figures,
landscapes, study cells, caches) goes through :func:`write_inside`: the name must stay
below the folder, and no folder or file below it may be a symbolic link (one planted
there would carry the write elsewhere): each folder is opened with ``O_NOFOLLOW`` relative
to the one above it, the file is written to a temporary name in that folder and renamed
into place there. :func:`remove_inside` deletes the same way, and :func:`inside` checks a
path before a writer that takes a folder (a run, a landscape) is given it.

fsspec and the file system's own package (``s3fs`` for ``s3://``) are optional:
``pip install 'gammatrace[s3]'``. Endpoint and credentials come from the usual places
(for S3: ``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, … or ``~/.aws``).

Example:
    >>> loc = location("s3://bucket/studies/bn/") / "vgg11-none"
    >>> loc, loc.name, loc.parent, str(loc.parent.parent)
    (Location('s3://bucket/studies/bn/vgg11-none'), 'vgg11-none', Location('s3://bucket/studies/bn'), 's3://bucket/studies')
    >>> location("file:///tmp/runs/a"), is_remote("runs/a"), is_remote("s3://b/a")
    (PosixPath('/tmp/runs/a'), False, True)
    >>> confined("analysis/last/../last/steps"), confined("../other")
    ('analysis/last/steps', None)
    >>> import tempfile; root = Path(tempfile.mkdtemp())
    >>> write_inside(root, "report/summary.md", lambda p: Path(p).write_text("ok")).read_text()
    'ok'
    >>> (root / "link").symlink_to(tempfile.mkdtemp())
    >>> write_inside(root, "link/x.md", lambda p: Path(p).write_text("no"))  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    gammatrace.store.backend.UnsafePathError: .../link is a symbolic link inside the output folder ...
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import posixpath
import secrets
import socket
import stat
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from gammatrace.errors import RunInUseError, UserError

# Seconds a lock on object storage stays valid without renewal; the holder renews it every
# third of that. A holder killed on another machine blocks the folder at most this long.
LOCK_TTL_S = float(os.environ.get("GAMMATRACE_LOCK_TTL", "120"))

# How long one call to an object store may wait (issue 22): at most S3_TIMEOUT_S seconds to
# connect and S3_TIMEOUT_S seconds for the server's next bytes, S3_ATTEMPTS attempts by
# botocore (AWS_MAX_ATTEMPTS where set) each retried S3_RETRIES times by s3fs: a store that
# stops answering ends the command in one line (StoreUnreachableError) after at most
# S3_RETRIES * attempts * 2 * S3_TIMEOUT_S seconds (plus a few seconds of back-off), 180 s by
# default, instead of botocore's 60 s timeouts times 25 attempts, or forever (see
# _no_expect_continue).
S3_TIMEOUT_S = float(os.environ.get("GAMMATRACE_S3_TIMEOUT", "15"))
S3_ATTEMPTS = 3
S3_RETRIES = 2


class MissingStoreDependency(UserError, ImportError):
    """A store URL needs fsspec (and the file system's package) that is not installed."""


class Location:
    """A folder (or file) on an fsspec file system, addressed by URL: the path-like value
    that :class:`~gammatrace.store.run.RunStore` holds as ``root`` for a remote run
    (``/`` joins, ``name``, ``parent``; ``str()`` is the URL).

    Example:
        >>> (Location("s3://b/x") / "a/b.pt").url, Location("s3://b/x").protocol
        ('s3://b/x/a/b.pt', 's3')
    """

    __slots__ = ("url",)

    def __init__(self, url: str):
        scheme, _, rest = str(url).partition("://")
        rest = posixpath.normpath("/" + rest).lstrip("/") if rest else ""
        self.url = f"{scheme}://{rest}"

    @property
    def protocol(self) -> str:
        return self.url.split("://", 1)[0]

    @property
    def key(self) -> str:
        """The path without the protocol, as fsspec file systems take it (``bucket/a/b``)."""
        return self.url.split("://", 1)[1]

    @property
    def name(self) -> str:
        return posixpath.basename(self.key)

    @property
    def parent(self) -> Location:
        return Location(f"{self.protocol}://{posixpath.dirname(self.key)}")

    def resolve(self) -> Location:
        return self

    def is_relative_to(self, other: Location | str) -> bool:
        other = str(other).rstrip("/")
        return self.url == other or self.url.startswith(other + "/")

    def __truediv__(self, rel: str | os.PathLike) -> Location:
        return Location(f"{self.url}/{os.fspath(rel)}")

    def __str__(self) -> str:
        return self.url

    def __repr__(self) -> str:
        return f"Location({self.url!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Location) and other.url == self.url

    def __hash__(self) -> int:
        return hash(self.url)


def is_remote(where: str | os.PathLike | Location) -> bool:
    """Whether ``where`` names a non-local file system (a URL other than ``file://``)."""
    if isinstance(where, Location):
        return True
    text = str(where)
    return "://" in text and not text.startswith("file://")


def location(where: str | os.PathLike | Location) -> Path | Location:
    """A local :class:`~pathlib.Path` (paths and ``file://`` URLs) or a :class:`Location`."""
    if isinstance(where, (Path, Location)):
        return where
    text = os.fspath(where)
    if text.startswith("file://"):
        return Path(text[len("file://"):])
    return Location(text) if "://" in text else Path(text)


def join(where: str | os.PathLike | Location, *parts: str) -> Path | Location:
    """``where / part / …`` for a local folder or a URL alike.

    Example:
        >>> join("s3://b/study", "run", "run.json"), join("runs", "a")
        (Location('s3://b/study/run/run.json'), PosixPath('runs/a'))
    """
    out = location(where)
    for p in parts:
        out = out / p
    return out


def confined(rel: str) -> str | None:
    """``rel`` normalised, or None when it is absolute or climbs out of its folder."""
    if not rel or rel.startswith("/") or "://" in rel:
        return None
    norm = posixpath.normpath(rel)
    return None if norm == ".." or norm.startswith("../") or norm == "." else norm


class UnsafePathError(UserError):
    """A write would leave its output folder: the name climbs out of it, or a folder or file
    below it is a symbolic link (planted there, it would carry the write elsewhere)."""


_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_DIRECTORY = getattr(os, "O_DIRECTORY", 0)


def _parts(root: Path, rel: str, what: str) -> list[str]:
    norm = confined(rel)
    if norm is None:
        raise UnsafePathError(f"{root / rel} lies outside {what} {root}; refusing to write there")
    return norm.split("/")


def _link_error(path: Path, root: Path, what: str) -> UnsafePathError:
    return UnsafePathError(f"{path} is a symbolic link inside {what} {root}; refusing to write through it "
                           "(remove the link, or choose another --out)")


def _is_link(name: str, dir_fd: int) -> bool:
    try:
        return stat.S_ISLNK(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode)
    except OSError:
        return False


@contextlib.contextmanager
def _folder(root: Path, parts: list[str], what: str, create: bool) -> Iterator[int]:
    """A descriptor of the folder ``root/parts…``, each step opened with ``O_NOFOLLOW``
    relative to the one above (``create``: made where missing). ``root`` itself is trusted:
    the caller chose it (see :func:`output_folder`)."""
    if create:
        root.mkdir(parents=True, exist_ok=True)
    fd = os.open(root, os.O_RDONLY | _DIRECTORY)
    try:
        for i, part in enumerate(parts):
            for _ in range(3):  # a concurrent writer may create the same folder meanwhile
                try:
                    nxt = os.open(part, os.O_RDONLY | _DIRECTORY | _NOFOLLOW, dir_fd=fd)
                    break
                except FileNotFoundError:
                    if not create:
                        raise
                    with contextlib.suppress(FileExistsError):
                        os.mkdir(part, 0o777, dir_fd=fd)
                except OSError:
                    if _is_link(part, fd):
                        raise _link_error(root.joinpath(*parts[:i + 1]), root, what) from None
                    raise
            else:
                raise FileNotFoundError(str(root.joinpath(*parts[:i + 1])))
            os.close(fd)
            fd = nxt
        yield fd
    finally:
        os.close(fd)


def inside(root: str | os.PathLike, rel: str, what: str = "the output folder") -> Path:
    """``root/rel``, refused (:class:`UnsafePathError`) when ``rel`` climbs out of ``root`` or
    an existing folder or file on the way below ``root`` is a symbolic link; for a writer
    that takes a folder (a run, a landscape, a report), before it is given one."""
    root = Path(root)
    parts = _parts(root, rel, what)
    path = root
    for part in parts:
        path = path / part
        if path.is_symlink():
            raise _link_error(path, root, what)
        if not path.exists():
            break
    return root / "/".join(parts)


def write_inside(root: str | os.PathLike, rel: str, write: Callable[[str], None],
                 what: str = "the output folder") -> Path:
    """Write ``root/rel`` atomically: ``write(path)`` fills a temporary file in the target's
    folder, which is then renamed into place. Refused (:class:`UnsafePathError`) when ``rel``
    leaves ``root`` or a folder or the file below ``root`` is a symbolic link; the folders are
    opened with ``O_NOFOLLOW`` (and created) one by one, and the temporary file is reached
    through the folder's descriptor, so a link planted meanwhile is not followed either.
    Returns ``root/rel``. The temporary file follows the umask."""
    root = Path(root)
    parts = _parts(root, rel, what)
    target = root / "/".join(parts)
    name = parts[-1]
    with _folder(root, parts[:-1], what, create=True) as dfd:
        if _is_link(name, dfd):
            raise _link_error(target, root, what)
        tmp = f".{name}.{secrets.token_hex(4)}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW, 0o666, dir_fd=dfd)
        os.close(fd)
        proc = f"/proc/self/fd/{dfd}"
        path = f"{proc}/{tmp}" if os.path.isdir(proc) else str(target.parent / tmp)
        try:
            write(path)
            if not stat.S_ISREG(os.stat(tmp, dir_fd=dfd, follow_symlinks=False).st_mode) or _is_link(name, dfd):
                raise _link_error(target, root, what)
            os.replace(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=dfd)
            raise
    return target


def write_bytes_inside(root: str | os.PathLike, rel: str, data: bytes, what: str = "the output folder") -> Path:
    """:func:`write_inside` of ``data``."""
    def put(path: str) -> None:
        with open(path, "wb") as f:
            f.write(data)
    return write_inside(root, rel, put, what)


def remove_inside(root: str | os.PathLike, rel: str, what: str = "the output folder") -> bool:
    """Delete the regular file ``root/rel`` (never through a symbolic link, never a link
    itself); False when there was none."""
    root = Path(root)
    parts = _parts(root, rel, what)
    try:
        with _folder(root, parts[:-1], what, create=False) as dfd:
            if not stat.S_ISREG(os.stat(parts[-1], dir_fd=dfd, follow_symlinks=False).st_mode):
                return False
            os.unlink(parts[-1], dir_fd=dfd)
            return True
    except (FileNotFoundError, NotADirectoryError):
        return False


def check_owner(path: str | os.PathLike) -> None:
    """Refuse ``path`` when a symbolic link leads to it from inside a run or study folder
    (the outermost folder above holding run.json or study.json): planted where the tool
    writes, it would carry a run, a study cell or a report elsewhere."""
    given = Path(os.path.abspath(path))
    owner = None
    for parent in given.parents:
        if (parent / "run.json").is_file() or (parent / "study.json").is_file():
            owner = parent
    if owner is not None:
        kind = "run" if (owner / "run.json").is_file() else "study"
        inside(owner, given.relative_to(owner).as_posix(), what=f"the {kind} folder")


def output_folder(out: str | os.PathLike, flag: str = "--out") -> tuple[Path, str | None]:
    """An output folder the user named, resolved once: (the folder, a line saying where a
    symbolic link led, else None). Refused by :func:`check_owner`.

    Example:
        >>> import tempfile; base = Path(tempfile.mkdtemp())
        >>> (base / "docs").symlink_to(base / "real", target_is_directory=True)
        >>> folder, note = output_folder(base / "docs")
        >>> folder == (base / "real"), note.endswith("is a symbolic link to " + str(base / "real") + "; writing there")
        (True, True)
    """
    check_owner(out)
    given = Path(os.path.abspath(out))
    resolved = given.resolve()
    if resolved == given:
        return Path(out), None
    return resolved, f"{flag} {out} is a symbolic link to {resolved}; writing there"


def _fsspec():
    try:
        # fsspec is the optional object-storage extra
        import fsspec
    except ImportError:
        raise MissingStoreDependency("a store URL (s3://, gs://, ...) needs fsspec: pip install 'gammatrace[s3]'") from None
    return fsspec


def filesystem(loc: Location) -> Any:
    """The fsspec file system of ``loc`` (one instance per protocol and process)."""
    fsspec = _fsspec()
    options: dict[str, Any] = {}
    if loc.protocol in ("s3", "s3a"):
        # Other processes (Ray workers, a resumed run) write the same folders: never
        # answer from a cached listing.
        options["use_listings_cache"] = False
        # Part of the instance's identity: another endpoint is another file system.
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint:
            options["endpoint_url"] = endpoint
        options.update(_s3_policy())
    try:
        fs = fsspec.filesystem(loc.protocol, **options)
    except ImportError as exc:
        raise MissingStoreDependency(f"{loc.url}: {' '.join(str(exc).split())}; for s3:// pip install "
                                     "'gammatrace[s3]'") from None
    except ValueError as exc:
        raise UserError(f"{loc.url}: {exc}") from None
    if loc.protocol in ("s3", "s3a"):
        fs.retries = S3_RETRIES  # s3fs's own retry loop around every call (a class attribute, 5)
    loop = getattr(fs, "loop", None)  # an async file system's event loop (fsspec's I/O thread)
    if loop is not None and loop.get_exception_handler() is not _quiet_connection_errors:
        loop.set_exception_handler(_quiet_connection_errors)
    return fs


_SESSION: Any = None


def _s3_policy() -> dict[str, Any]:
    """The s3fs options of the timeout and retry policy above (S3_TIMEOUT_S, S3_ATTEMPTS)
    and the botocore session that drops ``Expect: 100-continue``; one session per process,
    so fsspec's cache keeps one file system per endpoint."""
    global _SESSION
    if _SESSION is None:
        try:
            # s3fs's client, installed with it (the optional object-storage extra)
            import aiobotocore.session
        except ImportError:
            return {}  # s3fs is missing too: fsspec.filesystem says so, in one line
        session = aiobotocore.session.AioSession()
        session.register("before-call.s3", _no_expect_continue)  # after botocore's add_expect_header
        _SESSION = session
    try:
        attempts = int(os.environ.get("AWS_MAX_ATTEMPTS") or S3_ATTEMPTS)
    except ValueError:
        raise UserError(f"AWS_MAX_ATTEMPTS={os.environ['AWS_MAX_ATTEMPTS']!r} is not a whole number") from None
    return {"session": _SESSION,
            "config_kwargs": {"connect_timeout": S3_TIMEOUT_S, "read_timeout": S3_TIMEOUT_S,
                              "retries": {"max_attempts": max(1, attempts), "mode": "standard"}}}


def _no_expect_continue(params: dict[str, Any], **_: Any) -> None:
    """Send a PUT's body without waiting for ``100 Continue`` first. botocore asks for it on
    every file-like body (s3fs's ``put_file``); aiohttp then waits for the answer with no
    timeout (its read timeout starts once the body is sent), so a connection that went
    silent (a server host gone without a reset, a dropped NAT entry) held the command
    forever (the stalls of issue 22's outage tests)."""
    params.get("headers", {}).pop("Expect", None)


def _quiet_connection_errors(loop: Any, context: dict[str, Any]) -> None:
    """The I/O loop's handler of errors nobody awaited: a connection failure there (an
    aiohttp task still writing a request body when the connection was reset) is already
    reported by the call that awaited the request (as one line, see :func:`remote_error`);
    asyncio would log it again, as "Task exception was never retrieved" and a traceback.
    Anything else goes to asyncio's own handler."""
    exc = context.get("exception")
    if exc is not None and _unreachable(exc) is not None:
        return
    loop.default_exception_handler(context)


# Object-store failures that mean "the store cannot be reached" (the server is gone, a
# connection was refused, reset or timed out), by class name anywhere in the exception's
# MRO, so botocore and aiohttp (optional packages) need not be imported: botocore's
# HTTPClientError (EndpointConnectionError, ConnectionClosedError, ConnectTimeoutError,
# ReadTimeoutError, ProxyConnectionError, ...) and aiohttp's ClientConnectionError
# (ClientConnectorError, ServerDisconnectedError, ClientOSError, ...) and ClientPayloadError
# (a response cut short).
_UNREACHABLE = {"HTTPClientError", "ClientConnectionError", "ClientPayloadError", "ServerTimeoutError",
                "EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError"}


class StoreUnreachableError(UserError):
    """The object store cannot be reached: the server is gone, or a connection was refused,
    reset or timed out. Nothing half-written is left (every object is one PUT): the same
    command resumes once the store is back."""


def _unreachable(exc: BaseException) -> BaseException | None:
    """The connection failure in ``exc`` or in the exceptions it wraps, else None."""
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, (ConnectionError, TimeoutError)) or \
                any(k.__name__ in _UNREACHABLE for k in type(cur).__mro__):
            return cur
        cur = cur.__cause__ or cur.__context__
    return None


def _cause(exc: BaseException) -> str:
    """``ExceptionName: its message`` on one line, short."""
    text = " ".join(str(exc).split())
    text = text if len(text) <= 160 else text[:157] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def remote_error(exc: BaseException, what: str) -> UserError | None:
    """An object-store failure the user can fix, as one line (None: a bug, keep the traceback).

    Example:
        >>> print(remote_error(ConnectionResetError(104, "Connection reset by peer"), "reading s3://b/run.json"))
        reading s3://b/run.json: the object store cannot be reached (ConnectionResetError: [Errno 104] Connection reset by peer); check AWS_ENDPOINT_URL and the network, then rerun the same command to resume
    """
    if isinstance(exc, UserError):
        return exc
    if isinstance(exc, PermissionError):
        return UserError(f"{what}: permission denied by the object store; check the credentials and the bucket policy")
    if isinstance(exc, FileNotFoundError):
        return UserError(f"{what}: not found on the object store (does the bucket exist?)")
    cause = _unreachable(exc)
    if cause is not None:
        return StoreUnreachableError(f"{what}: the object store cannot be reached ({_cause(cause)}); check "
                                     "AWS_ENDPOINT_URL and the network, then rerun the same command to resume")
    return None


class ObjectFiles:
    """The files below one :class:`Location`, read and written through fsspec.

    Every write is one PUT of a complete file (written to a local temporary file first,
    then uploaded), so a killed writer leaves the old object or none, never a torn one.
    """

    def __init__(self, root: Location):
        self.root = root
        self.fs = filesystem(root)

    def key(self, rel: str = "") -> str:
        return self.root.key if not rel else f"{self.root.key}/{rel}"

    def _call(self, what: str, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except (FileNotFoundError, FileExistsError):
            raise
        except Exception as exc:
            mapped = remote_error(exc, what)
            if mapped is None:
                raise
            raise mapped from None

    def exists(self, rel: str = "") -> bool:
        return bool(self._call(f"reading {self.root / rel}", lambda: self.fs.exists(self.key(rel))))

    def is_file(self, rel: str) -> bool:
        # Not fs.isfile: it answers False for any error, so a store that dropped out would
        # read as a missing file.
        try:
            info = self._call(f"reading {self.root / rel}", lambda: self.fs.info(self.key(rel)))
        except FileNotFoundError:
            return False
        return info.get("type") == "file"

    def read_bytes(self, rel: str) -> bytes:
        """The object's bytes; FileNotFoundError when it does not exist."""
        return self._call(f"reading {self.root / rel}", lambda: self.fs.cat_file(self.key(rel)))

    def write(self, rel: str, write: Callable[[str], None]) -> None:
        """``write(local_path)`` fills a temporary file, uploaded as one object."""
        with tempfile.TemporaryDirectory(prefix="gammatrace-put-") as tmp:
            local = os.path.join(tmp, posixpath.basename(rel))
            write(local)
            self._call(f"writing {self.root / rel}", lambda: self.fs.put_file(local, self.key(rel)))

    def write_bytes(self, rel: str, data: bytes, **kwargs: Any) -> Any:
        return self._call(f"writing {self.root / rel}", lambda: self.fs.pipe_file(self.key(rel), data, **kwargs))

    def list(self, folder: str = "") -> list[str]:
        """Names of the files directly in ``folder`` (none when it does not exist)."""
        try:
            entries = self._call(f"listing {self.root / folder}",
                                 lambda: self.fs.ls(self.key(folder), detail=True, refresh=True))
        except FileNotFoundError:
            return []
        return sorted(posixpath.basename(e["name"].rstrip("/")) for e in entries if e.get("type") == "file")

    def folders(self, folder: str = "") -> list[str]:
        """Names of the sub-folders directly in ``folder``."""
        try:
            entries = self._call(f"listing {self.root / folder}",
                                 lambda: self.fs.ls(self.key(folder), detail=True, refresh=True))
        except FileNotFoundError:
            return []
        return sorted(posixpath.basename(e["name"].rstrip("/")) for e in entries if e.get("type") == "directory")

    def remove(self, rel: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._call(f"removing {self.root / rel}", lambda: self.fs.rm_file(self.key(rel)))

    def usage(self, rel: str = "") -> int:
        """Bytes stored below ``rel`` (the sum of the objects' sizes)."""
        try:
            return int(self._call(f"listing {self.root / rel}", lambda: self.fs.du(self.key(rel), total=True)))
        except FileNotFoundError:
            return 0

    def download(self, rel: str, local: Path, skip: Callable[[str], bool] = lambda rel: False) -> list[str]:
        """Copy the files below ``rel`` into the local folder ``local`` (those ``skip`` does
        not exclude, by their path relative to ``rel``); returns the copied names."""
        base = self.key(rel)
        try:
            found = self._call(f"listing {self.root / rel}", lambda: self.fs.find(base, detail=False))
        except FileNotFoundError:
            return []
        copied = []
        for key in sorted(found):
            sub = key[len(base):].lstrip("/")
            if not sub or skip(sub):
                continue
            target = local / sub
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(self._call(f"reading {self.root.protocol}://{key}", lambda k=key: self.fs.cat_file(k)))
            copied.append(sub)
        return copied

    def upload(self, local: Path, rel: str) -> None:
        """Copy the local folder ``local`` to ``rel`` below the root, file by file."""
        for path in sorted(p for p in Path(local).rglob("*") if p.is_file()):
            sub = path.relative_to(local).as_posix()
            key = self.key(f"{rel}/{sub}" if rel else sub)
            self._call(f"writing {self.root / sub}", lambda p=path, k=key: self.fs.put_file(str(p), k))

    # ------------------------------------------------------------------ lock
    @contextlib.contextmanager
    def lock(self, name: str = ".lock", ttl: float | None = None) -> Iterator[ObjectLock]:
        lock = ObjectLock(self, name, LOCK_TTL_S if ttl is None else ttl)
        lock.acquire()
        try:
            yield lock
        except BaseException:
            # The command fails (or is interrupted) anyway: its own line says why, and a lock
            # that cannot be removed now expires by itself.
            lock.release(quiet=True)
            raise
        lock.release()


def _host_identity() -> dict[str, Any]:
    """Who holds a lock: host name, boot and PID namespace (a PID means something only
    within them), PID."""
    ident: dict[str, Any] = {"host": socket.gethostname(), "pid": os.getpid()}
    with contextlib.suppress(OSError):
        ident["boot"] = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    with contextlib.suppress(OSError):
        ident["pidns"] = os.stat("/proc/self/ns/pid").st_ino
    return ident


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class ObjectLock:
    """The lock object of a remote folder: created with ``If-None-Match: *``, renewed by a
    thread of its holder, removed on release (see the module's description)."""

    def __init__(self, files: ObjectFiles, name: str, ttl: float):
        self.files, self.name, self.ttl = files, name, ttl
        self.token = uuid.uuid4().hex
        self.etag: str | None = None
        self.lost: str | None = None  # why the lock was lost while held
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def _conditional(self) -> bool:
        # If-Match on a PUT: S3 (and S3-compatible stores); elsewhere a plain overwrite.
        return self.files.root.protocol in ("s3", "s3a")

    def _body(self) -> bytes:
        return json.dumps({**_host_identity(), "token": self.token,
                           "expires": time.time() + self.ttl}).encode()

    def _etag(self, response: Any) -> str | None:
        if isinstance(response, dict) and response.get("ETag"):
            return response["ETag"]
        with contextlib.suppress(Exception):
            return self.files.fs.info(self.files.key(self.name)).get("ETag")
        return None

    def _holder(self) -> tuple[dict[str, Any] | None, str | None]:
        try:
            info = self.files._call(f"reading the lock {self.files.root / self.name}",
                                    lambda: self.files.fs.info(self.files.key(self.name)))
            raw = self.files.read_bytes(self.name)
        except FileNotFoundError:
            return None, None
        try:
            data = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            data = None  # a damaged lock object: expired (taken over with its ETag, so conditionally)
        return (data if isinstance(data, dict) else {}), info.get("ETag")

    def _stale(self, holder: dict[str, Any]) -> bool:
        expires = holder.get("expires")
        # NaN compares false with everything: a NaN (or infinite) expiry would hold forever
        if isinstance(expires, bool) or not isinstance(expires, (int, float)) or not math.isfinite(expires) \
                or expires < time.time():
            return True
        me = _host_identity()
        same_host = all(holder.get(k) == me.get(k) for k in ("host", "boot", "pidns"))
        return same_host and isinstance(holder.get("pid"), int) and holder["pid"] != me["pid"] \
            and not _alive(holder["pid"])

    def acquire(self) -> None:
        where = self.files.root
        try:
            self.etag = self._etag(self.files.write_bytes(self.name, self._body(), mode="create"))
        except FileExistsError:
            holder, etag = self._holder()
            if holder is not None and not self._stale(holder):
                who = f"process {holder.get('pid')} on {holder.get('host')}"
                raise RunInUseError(
                    f"{where} is in use by {who} (lock {where / self.name}); wait for it to finish, or stop it and "
                    "rerun the same command to resume (a lock of a killed process expires "
                    f"{self.ttl:.0f} s after its last renewal)") from None
            print(f"gammatrace: taking over the lock {where / self.name}: {self._why_stale(holder)}", file=sys.stderr)
            self._take_over(etag)
        self._thread = threading.Thread(target=self._renew, daemon=True, name="gammatrace-lock")
        self._thread.start()

    @staticmethod
    def _why_stale(holder: dict[str, Any] | None) -> str:
        if holder is None:
            return "it vanished"
        if not holder:
            return "it is not a lock gammatrace wrote (damaged or foreign)"
        expires = holder.get("expires")
        if isinstance(expires, bool) or not isinstance(expires, (int, float)) or not math.isfinite(expires):
            return f"its expiry {expires!r:.40} is not a time"
        if expires < time.time():
            return f"it expired {time.time() - expires:.0f} s ago (its holder stopped renewing it)"
        return f"its holder, process {holder.get('pid')} on this machine, is gone"

    def _take_over(self, etag: str | None) -> None:
        where = self.files.root
        try:
            if etag is None:  # vanished meanwhile
                response = self.files.write_bytes(self.name, self._body(), mode="create")
            elif self._conditional:
                response = self.files.write_bytes(self.name, self._body(), IfMatch=etag)
            else:
                response = self.files.write_bytes(self.name, self._body())
        except (FileExistsError, OSError):
            raise RunInUseError(f"{where} was locked by another process at the same moment; rerun the same "
                                "command to resume once it has finished") from None
        self.etag = self._etag(response)

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            try:
                kwargs = {"IfMatch": self.etag} if self._conditional and self.etag else {}
                self.etag = self._etag(self.files.write_bytes(self.name, self._body(), **kwargs))
            except Exception as exc:  # a lost lock must be reported by the next write, not crash a thread
                self.lost = f"the lock {self.files.root / self.name} could not be renewed ({type(exc).__name__})"
                return

    def check(self) -> None:
        """Raise when the lock was lost (another process took it over): stop writing."""
        if self.lost:
            raise RunInUseError(f"{self.lost}; another process may be writing {self.files.root}: stop both "
                                "and rerun one command to resume")

    def release(self, quiet: bool = False) -> None:
        """Stop renewing and remove the lock object if it is still ours; a store that dropped
        out meanwhile is one warning (none when ``quiet``: the command is failing anyway)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        try:
            holder, _ = self._holder()
            if holder is not None and holder.get("token") == self.token:
                self.files.remove(self.name)
        except UserError as exc:  # the store dropped out after the work: the lock expires by itself
            if not quiet:
                    print(f"gammatrace: warning: the lock {self.files.root / self.name} was not removed ({exc}); it "
                      f"expires {self.ttl:.0f} s after its last renewal", file=sys.stderr)
