"""Where a job may write: the place a location really names, confined to a root. No torch.

A location is read the way the filesystem that writes it reads it: a ``file://`` URI goes through
pyarrow, which percent-decodes its path (``file:///r/%2E%2E/x`` is ``/r/../x``, that is ``/x``),
and a local path through the OS, which follows symlinks. So a check on the spelled string proves
nothing; :func:`confine` checks the decoded, normalized, symlink-resolved place instead, and
every writer and deleter of a job's files calls it at the moment it writes (a symlink planted
after the job was accepted is caught there, not followed):

    spec time     output.dir: a '..' that decoding reveals, a file:// URI naming a host (uri_problem)
    cluster side  output.dir under $LORA_DIST_OUTPUT_ROOT (store.output_root_problem -> confine)
    write time    the artifact, checkpoints, their deletion, the work directory: under the job's
                  root, which is output.dir as confined when the job started (store.job_root)

A node-local directory of one user's (a URI job's staging) is made private:
:func:`private_dir` creates it 0700 and refuses one that someone else made first.
"""

from __future__ import annotations

import os
import posixpath
import re
import stat
from pathlib import Path
from urllib.parse import unquote

from lora_dist.errors import JobError

URI_RE = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")
DECODE_ROUNDS = 4  # '%252E' is '%2E' after one round: a '..' hidden under several is refused too


def _split(uri: str) -> tuple[str, str, str]:
    """(scheme lowercased, host, path) of ``scheme://host/path``."""
    scheme, rest = uri.split("://", 1)
    host, slash, path = rest.partition("/")
    return scheme.lower(), host, slash + path


def uri_problem(location: str) -> str | None:
    """Why a storage URI cannot name a place a job may write, or None (a local path: None).

    Refused: a ``..`` segment in the path once percent-decoded (in any of several rounds: what
    pyarrow decodes, and what a second decoding would), and a ``file://`` URI naming a host
    (``file://etc/x`` is host ``etc`` to pyarrow, which refuses it; ``file:///etc/x`` is the path).
    """
    if not URI_RE.match(location):
        return None
    scheme, host, path = _split(location)
    if scheme == "file" and host:
        return (f"must not name a host ({host!r}): a file:// URI names a path on this machine, as "
                f"file:///{host}{path}, got {location!r}")
    for _ in range(DECODE_ROUNDS):
        if ".." in path.split("/"):
            return f"must not contain '..' (also percent-encoded, as '%2E%2E'), got {location!r}"
        decoded = unquote(path)
        if decoded == path:
            return None
        path = decoded
    return f"must not be percent-encoded {DECODE_ROUNDS} times over, got {location!r}"


def confine(location: str | os.PathLike, root: str | None = None) -> str:
    """The place ``location`` names as it is written to, which must lie under ``root``.

    For a local path or a ``file://`` URI: the absolute local path, percent-decoded as pyarrow
    decodes it, with ``..`` and symlinks resolved. For another storage URI: ``scheme://host/path``
    with its path decoded and normalized (the storage's own credentials decide the rest).

    Args:
        location: a path or a storage URI.
        root: a value this function returned, taken as it is (not resolved again, so that a
            symlink planted since cannot move it); None confines nothing beyond :func:`uri_problem`.

    Returns:
        The place, as above.

    Raises:
        JobError: the URI is refused by :func:`uri_problem`, or the place is not under ``root``.
    """
    location = str(location)
    problem = uri_problem(location)
    if problem:
        raise JobError(problem)
    if URI_RE.match(location):
        scheme, host, path = _split(location)
        decoded = posixpath.normpath(unquote(path) or "/")
        place = (str(Path(decoded).resolve()) if scheme == "file"
                 else f"{scheme}://{host}{decoded if decoded != '/' else ''}")
    else:
        place = str(Path(location).expanduser().resolve())
    if root is not None and not under(place, root):
        raise JobError(f"{location} is outside {root}" + (f" (it names {place})" if place != location else ""))
    return place


def under(place: str, root: str) -> bool:
    """``place`` is ``root`` or inside it (both as :func:`confine` returns them)."""
    return place == root or place.startswith(root.rstrip("/") + "/")


def private_dir(path: Path) -> Path:
    """Make ``path`` and its parent directories of this user's, mode 0700, or take them as they are
    if this user made them; a directory of another user's, a symlink, or one others may write to
    is refused (another local user could have made it first, to read or swap what is staged).

    Raises:
        JobError: naming the directory and why.
    """
    path = Path(path)
    for d in (path.parent, path):
        try:
            d.mkdir(mode=0o700)
        except FileExistsError:
            pass
        st = os.lstat(d)
        if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
            raise JobError(f"{d}: not a directory of this user's (a symlink or a file is there); remove it")
        if st.st_uid != os.getuid() or st.st_mode & 0o077:
            raise JobError(f"{d}: belongs to uid {st.st_uid} with mode {stat.S_IMODE(st.st_mode):o}; a job stages "
                           f"only in a directory of its own user's, mode 0700: remove it")
    return path
