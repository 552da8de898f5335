"""Export one commit's tree into a directory, atomically and without following symlinks.

``GitSource.checkout`` streams ``git archive`` (a tar of the tree) into :func:`extract_tree`. We
extract it ourselves because the manifest loader must *see* hostile symlinks (a link to
``../../etc``) to refuse them, while extraction must never write through one. Only regular
files, directories and symlinks are created; names are checked to stay inside the destination.
The finished tree is read-only, so nothing downstream (a build writing ``__pycache__``, say)
can change a cached revision behind the cache's back.
"""

from __future__ import annotations

import os
import shutil
import stat
import tarfile
import tempfile
from pathlib import Path, PurePosixPath
from typing import IO

from reconciler.errors import SourceError

_FILE_MODE = 0o444
_EXEC_MODE = 0o555
_DIR_MODE = 0o555


def extract_tree(stream: IO[bytes], destination: Path) -> None:
    """Extract the tar ``stream`` into ``destination``, which must not exist yet.

    The tree is built under a temporary name beside ``destination`` and renamed into place only
    when complete, so a reader never sees half a revision.
    """
    destination.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{destination.name}.", dir=destination.parent))
    try:
        made: set[Path] = set()
        try:
            with tarfile.open(fileobj=stream, mode="r|") as archive:
                for member in archive:
                    _extract_member(archive, member, staging, made)
        except tarfile.TarError as exc:
            raise SourceError(f"cannot read the exported tree: {exc}") from exc
        # Deepest first: a directory must stay writable until its children are done.
        for directory in sorted(made, key=lambda p: len(p.parts), reverse=True):
            os.chmod(directory, _DIR_MODE)
        os.chmod(staging, _DIR_MODE)
        try:
            os.rename(staging, destination)
        except OSError:
            if not destination.is_dir():
                raise
            # Another process exported the same revision first; its copy is just as good.
            remove_tree(staging)
    except BaseException:
        remove_tree(staging)
        raise


def remove_tree(path: Path) -> None:
    """Delete an exported (read-only) tree; never follows a symlink inside it."""
    if not path.exists() and not path.is_symlink():
        return
    for current, dirnames, _ in os.walk(path):
        os.chmod(current, 0o755)
        # os.walk lists symlinks to directories as directories: do not chmod their targets.
        dirnames[:] = [d for d in dirnames if not os.path.islink(os.path.join(current, d))]
    shutil.rmtree(path, ignore_errors=True)


def _extract_member(
    archive: tarfile.TarFile, member: tarfile.TarInfo, root: Path, made: set[Path]
) -> None:
    if member.name in ("pax_global_header", ".", "./"):
        return
    name = PurePosixPath(member.name)
    if name.is_absolute() or ".." in name.parts:
        raise SourceError(f"refusing tree entry {member.name!r}: it would leave the checkout")
    target = root.joinpath(*name.parts)
    try:
        if member.isdir():
            _make_dirs(target, root, made)
        elif member.issym():
            _make_dirs(target.parent, root, made)
            # Stored exactly as committed, never resolved: the manifest loader judges it.
            os.symlink(member.linkname, target)
        elif member.isreg():
            _make_dirs(target.parent, root, made)
            source = archive.extractfile(member)
            if source is None:
                raise SourceError(f"cannot read tree entry {member.name!r}")
            mode = _EXEC_MODE if member.mode & stat.S_IXUSR else _FILE_MODE
            # O_EXCL + O_NOFOLLOW: never write through a symlink planted earlier in the stream.
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
            with os.fdopen(fd, "wb") as out:
                shutil.copyfileobj(source, out)
    except FileExistsError as exc:
        # A git tree never names one path twice; an archive that does is not to be trusted.
        raise SourceError(
            f"refusing tree entry {member.name!r}: the path is already taken in the checkout"
        ) from exc
    # Anything else (hard links, devices, fifos) cannot come from a git tree; skip it.


def _make_dirs(path: Path, root: Path, made: set[Path]) -> None:
    """Create ``path`` and its missing parents, all of them directories made by us.

    A parent that exists but was not made here is a symlink (or a file) from the archive:
    descending through it could write outside the checkout, so the tree is refused.
    """
    if path == root or path in made:
        return
    _make_dirs(path.parent, root, made)
    try:
        os.mkdir(path)
    except FileExistsError as exc:
        raise SourceError(
            f"refusing tree entry under {path.relative_to(root)}: it is not a directory"
        ) from exc
    made.add(path)
