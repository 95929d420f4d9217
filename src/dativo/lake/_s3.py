"""S3 through pyarrow's S3 filesystem, and the committer of Parquet files to an S3 prefix.

The supervisor uploads the files itself, so the writer container needs neither network nor
credentials. Each object is written in one request sequence and appears only when complete
(a multipart upload is invisible until it is completed), and uploading the same file to the same
key again is harmless: that is what makes rolling a publish journal forward after a crash safe.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pyarrow.fs as pafs

from dativo.lake._base import CommitRecord, LakeError, LakeFile
from dativo.lake._env import aws_settings

__all__ = ["S3ParquetCommitter", "open_staged", "s3_filesystem", "split_s3_url", "upload"]

_CHUNK = 8 << 20


def s3_filesystem() -> pafs.S3FileSystem:
    """pyarrow's S3 filesystem with credentials from the default AWS chain."""
    settings = aws_settings()
    kwargs: dict[str, Any] = {"region": settings["region"]}
    endpoint = settings.get("endpoint")
    if endpoint:
        parsed = urlparse(endpoint if "://" in endpoint else f"https://{endpoint}")
        kwargs["endpoint_override"] = parsed.netloc
        kwargs["scheme"] = parsed.scheme or "https"
    return pafs.S3FileSystem(**kwargs)


def split_s3_url(url: str) -> str:
    """`s3://bucket/prefix` -> `bucket/prefix`, the form pyarrow's filesystem takes."""
    parsed = urlparse(url)
    return f"{parsed.netloc}/{parsed.path.lstrip('/')}".rstrip("/")


def open_staged(staging: Path, rel: str) -> int:
    """Open a staged file for reading, refusing symlinks anywhere on the way."""
    root = staging.resolve()
    path = (staging / rel).resolve()
    if root not in path.parents:
        raise LakeError(f"staged file `{rel}` resolves outside the staging directory")
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise LakeError(f"staged file `{rel}` is not a regular file")
    return fd


def upload(fs: pafs.FileSystem, source_fd: int, destination: str) -> None:
    """Copy an open local file to `destination` (`bucket/key`); closes `source_fd`."""
    with os.fdopen(source_fd, "rb") as source, fs.open_output_stream(destination) as out:
        while chunk := source.read(_CHUNK):
            out.write(chunk)


class S3ParquetCommitter:
    """`format: parquet` with `target.path: s3://bucket/prefix`: upload the staged files."""

    kind = "s3-parquet"

    def __init__(self, url: str) -> None:
        self.url = url
        self._fs: pafs.S3FileSystem | None = None

    @property
    def fs(self) -> pafs.S3FileSystem:
        if self._fs is None:
            self._fs = s3_filesystem()
        return self._fs

    def describe(self) -> dict[str, Any]:
        return {"format": "parquet", "location": self.url}

    def close(self) -> None:
        self._fs = None

    def _key(self, rel: str) -> str:
        return f"{split_s3_url(self.url)}/{rel}"

    def check(self, staging: Path, files: Sequence[LakeFile]) -> None:
        try:
            infos = self.fs.get_file_info([self._key(f.path) for f in files]) if files else []
            bucket = self.fs.get_file_info(split_s3_url(self.url).split("/", 1)[0])
        except OSError as exc:
            raise LakeError(f"cannot reach {self.url}: {exc}", transient=True) from None
        if bucket.type == pafs.FileType.NotFound:
            raise LakeError(f"the bucket of `{self.url}` does not exist (or is not visible)")
        for info, file in zip(infos, files, strict=True):
            if info.type != pafs.FileType.NotFound:
                raise LakeError(
                    f"`{file.path}` already exists in {self.url}; refusing to overwrite it "
                    "(writers must put the run id in their file names)"
                )

    def find(self, run_id: str) -> CommitRecord | None:
        return None  # uploading again is idempotent: a roll-forward simply uploads again

    def commit(
        self, staging: Path, files: Sequence[LakeFile], run_id: str, state: dict[str, Any] | None
    ) -> dict[str, Any]:
        for file in files:
            key = self._key(file.path)
            try:
                fd = open_staged(staging, file.path)
            except FileNotFoundError:
                # Uploaded, then the staging was cleaned, by an earlier attempt: check it is there.
                info = self.fs.get_file_info(key)
                if info.type == pafs.FileType.File and info.size == file.bytes:
                    continue
                raise LakeError(
                    f"staged file `{file.path}` is gone and not in {self.url}"
                ) from None
            try:
                upload(self.fs, fd, key)
            except OSError as exc:
                raise LakeError(
                    f"uploading `{file.path}` to {self.url} failed: {exc}", transient=True
                ) from None
        return {"format": "parquet", "location": self.url, "objects": len(files)}
