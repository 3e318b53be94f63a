"""Downloads pinned by SHA-256: ``https://`` (or ``http://``) and ``file://`` (offline images, tests).

The file is streamed into a temporary file beside the destination while it is hashed; only when
the digest is the pinned one is it fsynced and renamed over the destination. A mismatch deletes the
temporary file and raises :class:`ChecksumMismatch`; the destination is never touched. A
destination that already has the pinned digest is kept (provisioning is idempotent).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import urllib.error
import urllib.request
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from urllib.parse import urlsplit

from agent.provision.errors import ChecksumMismatch, ProvisionError
from fleet.files import fsync_dir

SHA256_RE = re.compile(r"[0-9a-f]{64}")
CHUNK = 1 << 20
SCHEMES = ("https", "http", "file")


class Fetched(str, Enum):
    DOWNLOADED = "downloaded"
    ALREADY_PRESENT = "already present"


@dataclass(frozen=True)
class FetchResult:
    path: Path
    outcome: Fetched
    size: int


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def check_url(url: str) -> str:
    scheme = urlsplit(url).scheme
    if scheme not in SCHEMES:
        raise ProvisionError(f"model URL {url!r}: only {', '.join(s + '://' for s in SCHEMES)} are fetched")
    return url


def fetch_verified(
    url: str, sha256: str, dest: Path, *, mode: int = 0o644, max_bytes: int | None = None
) -> FetchResult:
    """Make ``dest`` hold the file at ``url`` whose SHA-256 is ``sha256`` (see the module doc)."""
    check_url(url)
    if SHA256_RE.fullmatch(sha256) is None:
        raise ProvisionError("the SHA-256 must be 64 lowercase hex digits")
    dest = Path(dest)
    if dest.is_file() and sha256_file(dest) == sha256:
        os.chmod(dest, mode)
        return FetchResult(dest, Fetched.ALREADY_PRESENT, dest.stat().st_size)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.part")
    digest = hashlib.sha256()
    size = 0
    try:
        try:
            response = urllib.request.urlopen(url, timeout=60)  # noqa: S310 (scheme checked above)
        except (urllib.error.URLError, OSError) as exc:
            raise ProvisionError(f"cannot fetch {url}: {exc}") from None
        with response, open(tmp, "wb") as out:
            while chunk := response.read(CHUNK):
                size += len(chunk)
                if max_bytes is not None and size > max_bytes:
                    raise ProvisionError(f"{url} is larger than {max_bytes} bytes")
                digest.update(chunk)
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        got = digest.hexdigest()
        if got != sha256:
            raise ChecksumMismatch(
                f"{url}: SHA-256 is {got}, expected {sha256}; refusing it (nothing was installed)"
            )
        os.chmod(tmp, mode)
        os.replace(tmp, dest)
        fsync_dir(dest.parent)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    return FetchResult(dest, Fetched.DOWNLOADED, size)
