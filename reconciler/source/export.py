"""Export one commit's tree into a directory, atomically and without following symlinks.

``git archive`` streams a tar of the tree; we extract it ourselves because the manifest loader
must *see* hostile symlinks (a link to ``../../etc``) to refuse them, while extraction must never
write through one. Only regular files, directories and symlinks are created; names are checked
to stay inside the destination.
"""

from __future__ import annotations

import os
import shutil
import tarfile
import tempfile
from pathlib import Path, PurePosixPath
from typing import IO

from reconciler.errors import SourceError


def extract_tree(stream: IO[bytes], destination: Path) -> None:
    """Extract the tar ``stream`` into ``destination``, which must not exist yet.

    The tree is built under a temporary name beside ``destination`` and renamed into place only
    when complete, so a reader never sees half a revision.
    """
    destination.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{destination.name}.", dir=destination.parent))
    try:
        with tarfile.open(fileobj=stream, mode="r|") as archive:
            for member in archive:
                _extract_member(archive, member, staging)
        try:
            os.rename(staging, destination)
        except OSError:
            if not destination.is_dir():  # another process exported the same revision first
                raise
            shutil.rmtree(staging, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _extract_member(archive: tarfile.TarFile, member: tarfile.TarInfo, root: Path) -> None:
    name = PurePosixPath(member.name)
    if name.is_absolute() or ".." in name.parts:
        raise SourceError(f"refusing tree entry {member.name!r}: it would leave the checkout")
    if member.name in ("pax_global_header", "."):
        return
    target = root.joinpath(*name.parts)
    if member.isdir():
        target.mkdir(parents=True, exist_ok=True)
    elif member.issym():
        target.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(member.linkname, target)
    elif member.isreg():
        target.parent.mkdir(parents=True, exist_ok=True)
        source = archive.extractfile(member)
        if source is None:
            raise SourceError(f"cannot read tree entry {member.name!r}")
        # O_EXCL + O_NOFOLLOW: never write through a symlink planted earlier in the stream.
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
        with os.fdopen(fd, "wb") as out:
            shutil.copyfileobj(source, out)
        if member.mode & 0o111:
            os.chmod(target, 0o755)
    # Anything else (hard links, devices) cannot come from a git tree; skip it.
