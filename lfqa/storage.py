"""Where checkpoints, models and data live outside the run folder: one small interface, two stores.

``S3Store`` talks to AWS S3 or any S3-compatible store through boto3 (retries, multipart transfers);
``LocalStore`` gives a plain folder the same interface, so checkpoint code and ``lfqa checkpoints list|pull|prune``
treat local and remote alike. ``BackgroundUploader`` moves a finished checkpoint off the training thread, and
``stage_s3_uri`` brings an ``s3://`` model folder or data file into a local cache.

Credentials come only from the standard AWS chain (environment, profile, instance or pod role): never from a job
file, never printed. A folder counts as complete only once its marker file (e.g. ``COMPLETE``) exists, and the
marker is always written last and deleted first.

    python -c "from lfqa.storage import open_store; open_store('s3://bucket/run').check()"
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from lfqa.errors import LfqaError

log = logging.getLogger(__name__)

MiB = 1024 * 1024


class StorageError(LfqaError, RuntimeError):
    """A storage operation failed. The message is one line: what, where (bucket/URI/endpoint), why; never a secret."""


# ---------------------------------------------------------------------------------------------------------- paths

_BAD_BUCKET = re.compile(r"[^A-Za-z0-9._-]")


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/a/b/`` -> ``("bucket", "a/b")``; ``s3://bucket`` -> ``("bucket", "")``."""
    if not isinstance(uri, str) or not uri.startswith("s3://"):
        raise StorageError(f"not an S3 URI: {uri!r} (expected s3://bucket[/prefix])")
    bucket, _, prefix = uri[len("s3://"):].partition("/")
    if not bucket:
        raise StorageError(f"S3 URI {uri!r} has no bucket (expected s3://bucket[/prefix])")
    if _BAD_BUCKET.search(bucket) or not 3 <= len(bucket) <= 255:
        raise StorageError(f"S3 URI {uri!r}: {bucket!r} is not a valid bucket name")
    prefix = prefix.strip("/")
    if "//" in prefix or any(part in (".", "..") for part in prefix.split("/")):
        raise StorageError(f"S3 URI {uri!r} has an empty, '.' or '..' path segment")
    return bucket, prefix


def _rel_parts(path: str) -> list[str]:
    """Split a store-relative "/"-separated path; refuse anything that could leave the store."""
    parts = [p for p in str(path).replace(os.sep, "/").split("/") if p not in ("", ".")]
    if ".." in parts:
        raise StorageError(f"path {path!r} must not contain '..'")
    return parts


def _join(*paths: str) -> str:
    return "/".join(part for path in paths for part in _rel_parts(path))


def _local_files(local_dir: Path) -> list[Path]:
    return sorted(p for p in local_dir.rglob("*") if p.is_file())


# ---------------------------------------------------------------------------------------------------------- stores


class Store(Protocol):
    """What checkpointing and the CLI need from a store. Paths are relative to the store's root, "/"-separated."""

    uri: str

    def url(self, path: str = "") -> str: ...
    def check(self) -> None: ...
    def upload_dir(self, local_dir: str | Path, remote_subpath: str, marker: str | None = None,
                   exclude: tuple[str, ...] = ()) -> int: ...
    def download_dir(self, remote_subpath: str, local_dir: str | Path) -> int: ...
    def upload_file(self, local_path: str | Path, remote_path: str) -> None: ...
    def download_file(self, remote_path: str, local_path: str | Path) -> None: ...
    def exists(self, path: str) -> bool: ...
    def read_text(self, path: str) -> str: ...
    def write_text(self, path: str, text: str) -> None: ...
    def list_subdirs(self, subpath: str = "") -> list[str]: ...
    def list_files(self, subpath: str = "") -> list[str]: ...
    def delete_prefix(self, subpath: str, marker: str | None = None) -> int: ...


class LocalStore:
    """A local folder with the :class:`Store` interface. Files are written to a temporary name and renamed, so a
    reader never sees half a file; ``upload_dir`` copies the marker last."""

    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser()
        self.uri = str(self.root)

    def __repr__(self) -> str:
        return f"LocalStore({self.uri!r})"

    def _path(self, path: str) -> Path:
        return self.root.joinpath(*_rel_parts(path))

    def url(self, path: str = "") -> str:
        return str(self._path(path))

    def check(self) -> None:
        probe = self.root / f".lfqa-write-probe-{uuid.uuid4().hex}"
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            probe.write_text("probe")
            probe.unlink()
        except OSError as e:
            raise StorageError(f"cannot write to store folder {self.root}: {e.strerror or e}") from e

    def _copy(self, src: Path, dst: Path) -> None:
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.with_name(f".{dst.name}.tmp-{uuid.uuid4().hex[:8]}")
        try:
            shutil.copyfile(src, tmp)
            os.replace(tmp, dst)
        finally:
            tmp.unlink(missing_ok=True)

    def upload_dir(self, local_dir: str | Path, remote_subpath: str, marker: str | None = None,
                   exclude: tuple[str, ...] = ()) -> int:
        src, dst = Path(local_dir), self._path(remote_subpath)
        files, marker_file = _plan_upload(src, marker, self.url(remote_subpath), exclude)
        if dst.exists() and dst.resolve() == src.resolve():
            return 0  # the store is the run folder itself: nothing to copy
        if marker:
            (dst / marker).unlink(missing_ok=True)
        total = 0
        try:
            for f in files:
                self._copy(f, dst / f.relative_to(src))
                total += f.stat().st_size
            if marker_file is not None:
                self._copy(marker_file, dst / marker)
                total += marker_file.stat().st_size
        except OSError as e:
            raise StorageError(f"copying {src} to {dst} failed: {e}") from e
        return total

    def download_dir(self, remote_subpath: str, local_dir: str | Path) -> int:
        src, dst = self._path(remote_subpath), Path(local_dir)
        if not src.is_dir():
            raise FileNotFoundError(f"no folder at {src}")
        total = 0
        for f in _local_files(src):
            self._copy(f, dst / f.relative_to(src))
            total += f.stat().st_size
        return total

    def upload_file(self, local_path: str | Path, remote_path: str) -> None:
        self._copy(Path(local_path), self._path(remote_path))

    def download_file(self, remote_path: str, local_path: str | Path) -> None:
        src = self._path(remote_path)
        if not src.is_file():
            raise FileNotFoundError(f"no file at {src}")
        self._copy(src, Path(local_path))

    def exists(self, path: str) -> bool:
        return self._path(path).is_file()

    def read_text(self, path: str) -> str:
        return self._path(path).read_text(encoding="utf-8")

    def write_text(self, path: str, text: str) -> None:
        dst = self._path(path)
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.with_name(f".{dst.name}.tmp-{uuid.uuid4().hex[:8]}")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, dst)

    def list_subdirs(self, subpath: str = "") -> list[str]:
        """The sub-folders that hold at least one file (an empty folder counts as absent, as on S3)."""
        base = self._path(subpath)
        if not base.is_dir():
            return []
        return sorted(p.name for p in base.iterdir()
                      if p.is_dir() and next((f for f in p.rglob("*") if f.is_file()), None) is not None)

    def list_files(self, subpath: str = "") -> list[str]:
        base = self._path(subpath)
        return [f.relative_to(base).as_posix() for f in _local_files(base)] if base.is_dir() else []

    def delete_prefix(self, subpath: str, marker: str | None = None) -> int:
        target = self._path(subpath)
        if not _rel_parts(subpath):
            raise StorageError(f"refusing to delete the whole store {self.uri}")
        if not target.is_dir():
            return 0
        count = len(_local_files(target))
        if marker:
            (target / marker).unlink(missing_ok=True)
        shutil.rmtree(target)
        return count


def _plan_upload(src: Path, marker: str | None, where: str,
                 exclude: tuple[str, ...] = ()) -> tuple[list[Path], Path | None]:
    """The files of ``src`` without the marker and the ``exclude``d relative paths, and the marker file (which must
    exist: it says the folder is done)."""
    if not src.is_dir():
        raise StorageError(f"cannot upload {src} to {where}: not a folder")
    marker_file = None
    if marker:
        marker_file = src.joinpath(*_rel_parts(marker))
        if not marker_file.is_file():
            raise StorageError(f"cannot upload {src} to {where}: its marker file {marker!r} is missing")
    skip = {"/".join(_rel_parts(e)) for e in exclude}
    files = [f for f in _local_files(src) if f != marker_file and f.relative_to(src).as_posix() not in skip]
    return files, marker_file


def _is_aws_endpoint(url: str) -> bool:
    host = url.split("://", 1)[-1].split("/", 1)[0].split(":", 1)[0]
    return host.endswith(".amazonaws.com") or host.endswith(".amazonaws.com.cn")


_ACCESS_KEY_ID = re.compile(r"\b(?:AKIA|ASIA|AIDA|AROA)[A-Z0-9]{12,}\b")
_SECRET_VARS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")

#: Client limits of :class:`S3Store` (``checkpoint.s3_max_attempts`` / ``checkpoint.s3_timeout_seconds``).
DEFAULT_MAX_ATTEMPTS = 6
DEFAULT_TIMEOUT = 5.0


def redact_secrets(text: str, extra: tuple[str | None, ...] = ()) -> str:
    """``text`` on one line, without the AWS credentials of the environment (or ``extra``) or anything shaped
    like an access key id."""
    for secret in [os.environ.get(v) for v in _SECRET_VARS] + list(extra):
        if secret and len(secret) >= 4:
            text = text.replace(secret, "***")
    return _ACCESS_KEY_ID.sub("***", " ".join(str(text).split()))

_CODE_HINTS = {
    "NoSuchBucket": "the bucket does not exist",
    "InvalidAccessKeyId": "the access key id is not known to the endpoint",
    "SignatureDoesNotMatch": "the secret key does not match the access key (or the request was altered)",
    "InvalidToken": "the session token is invalid",
    "ExpiredToken": "the session token has expired",
    "AccessDenied": "access denied: the credentials lack permission",
    "AllAccessDisabled": "access to the bucket is disabled",
    "RequestTimeTooSkewed": "this machine's clock is too far off",
    "PermanentRedirect": "the bucket is in another region: set output.s3_region",
    "AuthorizationHeaderMalformed": "wrong region for the bucket: set output.s3_region",
}


class S3Store:
    """An ``s3://bucket/prefix`` on AWS or any S3-compatible endpoint.

    Every request retries (botocore "standard" mode: exponential backoff on 5xx, throttling, dropped connections
    and timeouts), at most ``max_attempts`` tries of at most ``timeout`` seconds each to connect and to wait for
    an answer. An endpoint that accepts connections and never replies fails a read in about
    ``max_attempts * timeout`` seconds and a write in twice that (it first waits for "100 Continue"): at most a
    minute by default, not many minutes. Files go
    through boto3's transfer manager (multipart above ``multipart_threshold``, ``workers`` parallel transfers).
    Missing objects raise ``FileNotFoundError``; everything else that fails raises :class:`StorageError`.
    """

    def __init__(self, uri: str, endpoint_url: str | None = None, region: str | None = None, workers: int = 8,
                 *, multipart_threshold: int = 16 * MiB, multipart_chunksize: int = 16 * MiB,
                 max_attempts: int = DEFAULT_MAX_ATTEMPTS, timeout: float = DEFAULT_TIMEOUT):
        import boto3
        from boto3.s3.transfer import TransferConfig

        self.bucket, self.prefix = parse_s3_uri(uri)
        self.uri = f"s3://{self.bucket}" + (f"/{self.prefix}" if self.prefix else "")
        self.workers = max(1, int(workers))
        self.max_attempts, self.timeout = max(1, int(max_attempts)), float(timeout)
        self._multipart = (multipart_threshold, multipart_chunksize)
        connect_timeout = read_timeout = self.timeout
        self._session = boto3.session.Session(region_name=region)
        # Resolved once here (the client would do the same) so that error messages can redact them.
        self._credentials = self._session.get_credentials()
        self._endpoint_url = endpoint_url  # None: botocore's own lookup (AWS_ENDPOINT_URL, profile, AWS)
        self._region = region
        self._s3_options: dict | None = None
        self._client = self._make_client(self.max_attempts, connect_timeout, read_timeout,
                                            max_pool=self.workers + 2)
        self.endpoint = self._client.meta.endpoint_url
        if not _is_aws_endpoint(self.endpoint):
            # S3-compatible stores (MinIO, SeaweedFS, Ceph) rarely have wildcard DNS for bucket.host: use path style.
            self._s3_options = {"addressing_style": "path"}
            self._client = self._make_client(self.max_attempts, connect_timeout, read_timeout,
                                            max_pool=self.workers + 2)
        self.transfer_config = TransferConfig(
            multipart_threshold=multipart_threshold, multipart_chunksize=multipart_chunksize,
            max_concurrency=self.workers, use_threads=True, preferred_transfer_client="classic")

    def _make_client(self, max_attempts: int, connect_timeout: float, read_timeout: float, max_pool: int):
        from botocore.config import Config

        # total_max_attempts counts the first try; retries["max_attempts"] would count only the retries.
        config = Config(retries={"mode": "standard", "total_max_attempts": max_attempts},
                        connect_timeout=connect_timeout, read_timeout=read_timeout, tcp_keepalive=True,
                        max_pool_connections=max(10, max_pool), s3=self._s3_options)
        return self._session.client("s3", endpoint_url=self._endpoint_url, config=config)

    def __repr__(self) -> str:
        return f"S3Store({self.uri!r}, endpoint={self.endpoint!r})"

    def with_limits(self, max_attempts: int, timeout: float) -> S3Store:
        """The same store with other client limits (tries per request, seconds per try)."""
        threshold, chunksize = self._multipart
        return S3Store(self.uri, self._endpoint_url, self._region, self.workers, multipart_threshold=threshold,
                       multipart_chunksize=chunksize, max_attempts=max_attempts, timeout=timeout)

    # -- naming and errors

    def _key(self, path: str = "") -> str:
        return _join(self.prefix, path)

    def _dir_prefix(self, subpath: str = "") -> str:
        key = self._key(subpath)
        return f"{key}/" if key else ""

    def url(self, path: str = "") -> str:
        key = self._key(path)
        return f"s3://{self.bucket}/{key}" if key else f"s3://{self.bucket}"

    def _redact(self, text: str) -> str:
        secrets: list[str | None] = []
        if self._credentials is not None:
            try:
                frozen = self._credentials.get_frozen_credentials()
                secrets += [frozen.access_key, frozen.secret_key, frozen.token]
            except Exception:  # a refresh failure must not hide the error being reported
                pass
        return redact_secrets(text, tuple(secrets))

    def _cause(self, exc: BaseException) -> str:
        from botocore.exceptions import (
            ClientError,
            ConnectTimeoutError,
            EndpointConnectionError,
            NoCredentialsError,
            PartialCredentialsError,
            ReadTimeoutError,
        )

        if isinstance(exc, ClientError):
            err = exc.response.get("Error", {})
            code = str(err.get("Code") or "")
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            hint = _CODE_HINTS.get(code) or {404: "not found", 403: "access denied (403)"}.get(status)
            text = f"{hint} ({code})" if hint else f"{code or status}: {err.get('Message') or exc}"
        elif isinstance(exc, NoCredentialsError | PartialCredentialsError):
            text = ("no usable AWS credentials found (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
                    "AWS_PROFILE, or give the machine/pod a role)")
        elif isinstance(exc, EndpointConnectionError | ConnectTimeoutError):
            text = f"cannot connect to endpoint {self.endpoint} ({type(exc).__name__})"
        elif isinstance(exc, ReadTimeoutError):
            text = f"endpoint {self.endpoint} did not answer in time (ReadTimeoutError)"
        else:
            text = f"{type(exc).__name__}: {exc}"
        return self._redact(text)

    def _error(self, what: str, exc: BaseException) -> StorageError:
        return StorageError(f"{what}: {self._cause(exc)}")

    @staticmethod
    def _is_not_found(exc: BaseException) -> bool:
        from botocore.exceptions import ClientError

        if not isinstance(exc, ClientError):
            return False
        code = str(exc.response.get("Error", {}).get("Code"))
        return code in ("404", "NoSuchKey", "NotFound")

    # -- fail fast

    def check(self, timeout: float = 3.0) -> None:
        """Prove before training that the bucket exists, the credentials work and may list, write and delete.

        Uses its own client with short timeouts and four attempts: a refused or timed-out endpoint still fails in
        seconds, while one dropped connection or 5xx of a flaky network does not stop the job.
        """
        client = self._make_client(4, timeout, timeout, max_pool=2)
        where = f"S3 check of {self.uri} at {self.endpoint}"
        try:
            client.list_objects_v2(Bucket=self.bucket, Prefix=self._dir_prefix(), MaxKeys=1)
        except Exception as e:
            raise self._error(f"{where} failed", e) from None
        probe = self._key(f".lfqa-write-probe-{uuid.uuid4().hex}")
        try:
            client.put_object(Bucket=self.bucket, Key=probe, Body=b"probe")
            client.delete_object(Bucket=self.bucket, Key=probe)
        except Exception as e:
            raise self._error(f"{where} failed: cannot write and delete s3://{self.bucket}/{probe}", e) from None

    # -- folders

    def _transfer_all(self, jobs: list[tuple[str, Callable[[object], Future]]]) -> list[tuple[str, BaseException]]:
        """Run transfers on one transfer manager; every transfer is waited for, failures are returned."""
        from boto3.s3.transfer import create_transfer_manager

        failures = []
        with create_transfer_manager(self._client, self.transfer_config) as manager:
            futures = [(name, start(manager)) for name, start in jobs]
            for name, future in futures:
                try:
                    future.result()
                except Exception as e:  # collected and reported together below
                    failures.append((name, e))
        return failures

    def upload_dir(self, local_dir: str | Path, remote_subpath: str, marker: str | None = None,
                   exclude: tuple[str, ...] = ()) -> int:
        """Upload every file under ``local_dir`` (but the ``exclude``d relative paths) to ``remote_subpath/``;
        then, only if all succeeded, the marker.

        A marker left by an earlier upload to the same place is deleted first, so a folder that is being replaced
        never looks complete. Returns the bytes uploaded.
        """
        src = Path(local_dir)
        where = self.url(remote_subpath)
        files, marker_file = _plan_upload(src, marker, where, exclude)
        started = time.monotonic()
        if marker:
            try:
                self._client.delete_object(Bucket=self.bucket, Key=self._key(f"{remote_subpath}/{marker}"))
            except Exception as e:
                raise self._error(f"upload of {src} to {where} failed: cannot remove the old marker", e) from None

        def job(f: Path):
            key = self._key(f"{remote_subpath}/{f.relative_to(src).as_posix()}")
            return f.relative_to(src).as_posix(), lambda m: m.upload(str(f), self.bucket, key)

        try:
            failures = self._transfer_all([job(f) for f in files])
        except Exception as e:
            raise self._error(f"upload of {src} to {where} failed", e) from None
        if failures:
            name, exc = failures[0]
            raise StorageError(f"upload of {src} to {where} failed for {len(failures)} of {len(files)} files "
                               f"(marker not written); first: {name}: {self._cause(exc)}")
        if marker_file is not None:
            self.upload_file(marker_file, f"{remote_subpath}/{marker}")
        total = sum(f.stat().st_size for f in files) + (marker_file.stat().st_size if marker_file else 0)
        seconds = time.monotonic() - started
        log.info("uploaded %d files (%.1f MiB) to %s in %.1f s", len(files) + bool(marker_file), total / MiB, where,
                 seconds)
        return total

    def _objects(self, subpath: str, what: str) -> dict[str, dict]:
        """Every object under ``subpath/``: relative path -> {"size", "etag"}. Folder placeholder keys are skipped."""
        prefix = self._dir_prefix(subpath)
        out: dict[str, dict] = {}
        try:
            for page in self._client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
                for obj in page.get("Contents", []):
                    rel = obj["Key"][len(prefix):]
                    if rel and not rel.endswith("/"):
                        out[rel] = {"size": obj["Size"], "etag": obj.get("ETag", "").strip('"')}
        except Exception as e:
            raise self._error(f"{what}: cannot list {self.url(subpath)}/", e) from None
        return out

    def download_dir(self, remote_subpath: str, local_dir: str | Path) -> int:
        """Download every object under ``remote_subpath/`` into ``local_dir``; returns the bytes downloaded."""
        dst = Path(local_dir)
        where = self.url(remote_subpath)
        objects = self._objects(remote_subpath, f"download of {where}")
        if not objects:
            raise FileNotFoundError(f"nothing under {where}/")
        jobs = []
        for rel in objects:
            target = dst.joinpath(*_rel_parts(rel))  # _rel_parts refuses '..' from a hostile listing
            target.parent.mkdir(parents=True, exist_ok=True)
            key = f"{self._dir_prefix(remote_subpath)}{rel}"
            jobs.append((rel, lambda m, key=key, target=target: m.download(self.bucket, key, str(target))))
        try:
            failures = self._transfer_all(jobs)
        except Exception as e:
            raise self._error(f"download of {where} to {dst} failed", e) from None
        if failures:
            name, exc = failures[0]
            raise StorageError(f"download of {where} to {dst} failed for {len(failures)} of {len(jobs)} files; "
                               f"first: {name}: {self._cause(exc)}")
        return sum(o["size"] for o in objects.values())

    # -- single objects

    def upload_file(self, local_path: str | Path, remote_path: str) -> None:
        failures = self._transfer_all([(str(local_path), lambda m: m.upload(str(local_path), self.bucket,
                                                                            self._key(remote_path)))])
        if failures:
            raise self._error(f"upload of {local_path} to {self.url(remote_path)} failed", failures[0][1])

    def download_file(self, remote_path: str, local_path: str | Path) -> None:
        Path(local_path).parent.mkdir(parents=True, exist_ok=True)
        failures = self._transfer_all([(remote_path, lambda m: m.download(self.bucket, self._key(remote_path),
                                                                          str(local_path)))])
        if failures:
            if self._is_not_found(failures[0][1]):
                raise FileNotFoundError(f"no object at {self.url(remote_path)}")
            raise self._error(f"download of {self.url(remote_path)} failed", failures[0][1])

    def _head(self, path: str) -> dict | None:
        try:
            return self._client.head_object(Bucket=self.bucket, Key=self._key(path))
        except Exception as e:
            if self._is_not_found(e):
                return None
            raise self._error(f"cannot look up {self.url(path)}", e) from None

    def exists(self, path: str) -> bool:
        """Whether an object exists at ``path`` (a "folder" with objects under it does not count)."""
        return bool(self._key(path)) and self._head(path) is not None

    def read_text(self, path: str) -> str:
        try:
            body = self._client.get_object(Bucket=self.bucket, Key=self._key(path))["Body"].read()
        except Exception as e:
            if self._is_not_found(e):
                raise FileNotFoundError(f"no object at {self.url(path)}") from None
            raise self._error(f"cannot read {self.url(path)}", e) from None
        return body.decode("utf-8")

    def write_text(self, path: str, text: str) -> None:
        try:
            self._client.put_object(Bucket=self.bucket, Key=self._key(path), Body=text.encode("utf-8"))
        except Exception as e:
            raise self._error(f"cannot write {self.url(path)}", e) from None

    # -- listing and deleting

    def list_subdirs(self, subpath: str = "") -> list[str]:
        """Names of the immediate "folders" under ``subpath`` that hold at least one object (sorted).

        Some stores keep listing a prefix as a folder after its last object was deleted (SeaweedFS for about two
        minutes): each listed prefix is looked into once, and an empty one counts as absent, as on AWS.
        """
        prefix = self._dir_prefix(subpath)
        names = set()
        try:
            pages = self._client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=prefix, Delimiter="/")
            for page in pages:
                names.update(cp["Prefix"][len(prefix):].rstrip("/") for cp in page.get("CommonPrefixes", []))
            return sorted(n for n in names if n and self._has_objects(f"{prefix}{n}/"))
        except Exception as e:
            raise self._error(f"cannot list {self.url(subpath)}/", e) from None

    def _has_objects(self, key_prefix: str) -> bool:
        page = self._client.list_objects_v2(Bucket=self.bucket, Prefix=key_prefix, MaxKeys=1)
        return bool(page.get("KeyCount") or page.get("Contents"))

    def list_files(self, subpath: str = "") -> list[str]:
        """Every object under ``subpath``, as sorted paths relative to it."""
        return sorted(self._objects(subpath, "list"))

    def delete_prefix(self, subpath: str, marker: str | None = None) -> int:
        """Delete everything under ``subpath/`` (never a sibling that merely starts with the same name); the marker
        goes first so that a half-deleted folder never looks complete. Returns the number of objects deleted."""
        if not _rel_parts(subpath):
            raise StorageError(f"refusing to delete the whole store {self.uri}")
        where = self.url(subpath)
        keys = [f"{self._dir_prefix(subpath)}{rel}" for rel in self._objects(subpath, f"delete of {where}")]
        try:
            if marker:
                self._client.delete_object(Bucket=self.bucket, Key=self._key(f"{subpath}/{marker}"))
            for start in range(0, len(keys), 1000):  # DeleteObjects takes at most 1000 keys
                batch = [{"Key": k} for k in keys[start:start + 1000]]
                resp = self._client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})
                if resp.get("Errors"):
                    first = resp["Errors"][0]
                    raise StorageError(f"delete of {where} failed for {len(resp['Errors'])} objects; first: "
                                       f"{first.get('Key')}: {first.get('Code')}")
        except StorageError:
            raise
        except Exception as e:
            raise self._error(f"delete of {where} failed", e) from None
        return len(keys)


def open_store(uri: str | Path, endpoint_url: str | None = None, region: str | None = None,
               workers: int = 8, max_attempts: int = DEFAULT_MAX_ATTEMPTS,
               timeout: float = DEFAULT_TIMEOUT) -> S3Store | LocalStore:
    """``s3://...`` -> :class:`S3Store`; anything else is a local folder -> :class:`LocalStore`."""
    if str(uri).startswith("s3://"):
        return S3Store(str(uri), endpoint_url=endpoint_url, region=region, workers=workers,
                       max_attempts=max_attempts, timeout=timeout)
    if "://" in str(uri):
        raise StorageError(f"unsupported storage URI {str(uri)!r}: use s3://bucket/prefix or a local folder")
    return LocalStore(uri)


# ---------------------------------------------------------------------------------------------------------- uploader


@dataclass
class _Upload:
    local_dir: Path
    remote_subpath: str
    marker: str | None
    exclude: tuple[str, ...]
    attempts: int = 0
    not_before: float = 0.0


class BackgroundUploader:
    """Uploads finished folders on one background thread, one at a time; when it falls behind, the newest first.

    ``submit`` returns at once when nothing is uploading. Otherwise it waits for the running upload, at most
    ``wait_seconds`` (None: as long as it takes, so that every folder is uploaded, in order), and then leaves the
    folder in a queue of one place: a newer ``submit`` takes that place and the older folder is dropped (reported,
    kept in ``dropped``). So when the store is slow or down, the next upload is always of the newest folder, and
    a stuck upload holds the caller for at most ``wait_seconds``.

    A failed upload is reported and kept in ``errors``; it never raises into the caller. With ``retry_seconds``
    it is tried again that long after each failure, until it succeeds or a newer folder takes its place.
    ``on_done(remote_subpath, ok)`` runs on the worker after each try (retention goes there). ``report`` gets
    each one-line message (default: this module's logger).
    """

    def __init__(self, store: Store, on_done: Callable[[str, bool], None] | None = None, isolate: bool = False,
                 nice: int = 19, *, wait_seconds: float | None = None, retry_seconds: float | None = None,
                 report: Callable[[str], None] | None = None):
        self.store = store
        self.on_done = on_done
        # isolate: each upload runs in a child process at the lowest CPU priority (see upload_in_child).
        self.isolate = isolate and isinstance(store, S3Store)
        self.nice = nice
        self.wait_seconds = wait_seconds
        self.retry_seconds = retry_seconds
        self.report = report or (lambda message: log.warning("%s", message))
        self.errors: list[str] = []
        self.completed: list[str] = []
        self.dropped: list[str] = []
        self.last_error: str | None = None
        self.last_ok: bool | None = None
        self._cond = threading.Condition()
        self._pending: _Upload | None = None
        self._running: _Upload | None = None
        self._closing = False
        self._cancelled = False
        self._deadline: float | None = None
        self._close_retries = 0
        self._child: subprocess.Popen | None = None
        self._thread = threading.Thread(target=self._run, name="lfqa-uploader", daemon=True)
        self._thread.start()

    @property
    def busy(self) -> bool:
        with self._cond:
            return self._running is not None or self._pending is not None

    @property
    def queued(self) -> str | None:
        """The remote path of the folder waiting for its (next) try, if any."""
        with self._cond:
            return self._pending.remote_subpath if self._pending is not None else None

    def submit(self, local_dir: str | Path, remote_subpath: str, marker: str | None = None,
               exclude: tuple[str, ...] = ()) -> float:
        started = time.monotonic()
        limit = None if self.wait_seconds is None else started + self.wait_seconds
        dropped = None
        with self._cond:
            if self._closing:
                raise RuntimeError("BackgroundUploader is closed")
            while self._running is not None or (self._pending is not None and not self._pending.attempts):
                left = None if limit is None else limit - time.monotonic()
                if left is not None and left <= 0:
                    break
                self._cond.wait(left)
            if self._pending is not None:
                dropped = self._pending.remote_subpath
                self.dropped.append(dropped)
            self._pending = _Upload(Path(local_dir), remote_subpath, marker, tuple(exclude))
            self._cond.notify_all()
        waited = time.monotonic() - started
        if dropped is not None:
            self.report(f"{dropped} will not be uploaded: {remote_subpath} is newer and goes first")
        return waited

    def wait(self, timeout: float | None = None) -> bool:
        """Block until nothing runs and nothing waits for its first try (a failed folder waiting to be tried
        again does not count); False if ``timeout`` passed first."""
        with self._cond:
            return self._cond.wait_for(
                lambda: self._running is None and (self._pending is None or self._pending.attempts > 0), timeout)

    def close(self, timeout: float | None = None, retries: int = 0) -> bool:
        """Finish what is queued and stop the thread; True if the last upload succeeded and nothing is left.

        A folder that fails from now on is tried again at most ``retries`` more times (``retry_seconds`` apart),
        all within ``timeout`` seconds: past it, a running upload in a child process is killed, the queue is
        dropped and the thread is left to end.
        """
        with self._cond:
            self._closing = True
            self._deadline = None if timeout is None else time.monotonic() + timeout
            self._close_retries = retries
            self._cond.notify_all()
        self._thread.join(timeout)
        if self._thread.is_alive():
            self._cancel()
            self._thread.join(5)
        with self._cond:
            return not self._thread.is_alive() and self._pending is None and self.last_ok is not False

    def _cancel(self) -> None:
        with self._cond:
            self._cancelled = True
            if self._pending is not None:
                self.dropped.append(self._pending.remote_subpath)
                self._pending = None
                self.last_ok = False  # what was queued last never got there
            child = self._child
            self._cond.notify_all()
        if child is not None and child.poll() is None:
            child.kill()

    def _next(self) -> _Upload | None:
        """The folder to upload now (waiting for it to be queued or due); None when closed."""
        with self._cond:
            while True:
                if self._cancelled or (self._pending is None and self._closing):
                    return None
                job, now = self._pending, time.monotonic()
                if job is None:
                    self._cond.wait()
                elif job.not_before > now:
                    self._cond.wait(job.not_before - now)
                else:
                    self._pending, self._running = None, job
                    return job

    def _retry_later(self, job: _Upload) -> bool:
        """Called with the lock held after ``job`` failed: queue it again if that is allowed."""
        if self.retry_seconds is None or self._cancelled or self._pending is not None:
            return False
        due = time.monotonic() + self.retry_seconds
        if self._closing:
            if self._close_retries <= 0 or (self._deadline is not None and due >= self._deadline):
                return False
            self._close_retries -= 1
        job.attempts += 1
        job.not_before = due
        self._pending = job
        return True

    def _set_child(self, child: subprocess.Popen) -> None:
        with self._cond:
            self._child = child
            cancelled = self._cancelled
        if cancelled:
            child.kill()

    def _upload(self, job: _Upload) -> None:
        if self.isolate:
            upload_in_child(self.store, job.local_dir, job.remote_subpath, job.marker, job.exclude, self.nice,
                            on_start=self._set_child)
        else:
            self.store.upload_dir(job.local_dir, job.remote_subpath, job.marker, exclude=job.exclude)

    def _run(self) -> None:
        while (job := self._next()) is not None:
            ok = False
            try:
                self._upload(job)
                ok = True
                self.completed.append(job.remote_subpath)
            except Exception as e:  # reported, never raised into training
                message = f"upload of {job.remote_subpath} failed: {e}"
                self.last_error = message
                self.errors.append(message)
                self.report(message)
            self.last_ok = ok
            if self.on_done is not None:
                try:
                    self.on_done(job.remote_subpath, ok)
                except Exception as e:
                    message = f"after-upload step for {job.remote_subpath} failed: {e}"
                    self.errors.append(message)
                    self.report(message)
            with self._cond:
                self._running, self._child = None, None
                if not ok:
                    self._retry_later(job)
                self._cond.notify_all()


# ---------------------------------------------------------------------------------------------------------- staging

_MANIFEST = "manifest.json"


def stage_s3_uri(uri: str, cache_dir: str | Path, endpoint_url: str | None = None,
                 region: str | None = None) -> Path:
    """Bring an ``s3://`` folder (a model) or single object (a data file) into ``cache_dir``; return its local path.

    The copy lives at ``cache_dir/<name>-<hash of the URI>/<name>`` (a file keeps its name, so its extension still
    tells the format). It is downloaded to a temporary folder and renamed into place, so a copy that exists is
    complete. The next call lists the remote (sizes, ETags) and reuses the copy when nothing changed; when the
    store cannot be reached it reuses the copy with a warning. A URI ending in "/" is always a folder.
    """
    bucket, key = parse_s3_uri(uri)
    store = S3Store(f"s3://{bucket}", endpoint_url=endpoint_url, region=region)
    name = key.rsplit("/", 1)[-1] or bucket
    digest = hashlib.sha256(f"{store.endpoint}|{bucket}/{key}|{uri.endswith('/')}".encode()).hexdigest()[:16]
    cache = Path(cache_dir).expanduser()
    final = cache / f"{name}-{digest}"
    manifest = _read_manifest(final)

    try:
        remote = _remote_listing(store, uri, key)
    except StorageError as e:
        if manifest is not None:
            log.warning("using the cached copy of %s in %s: %s", uri, final, e)
            return final / name
        raise
    if manifest is not None and manifest["objects"] == remote["objects"] and manifest["kind"] == remote["kind"]:
        return final / name

    cache.mkdir(parents=True, exist_ok=True)
    tmp = cache / f".tmp-{name}-{digest}-{uuid.uuid4().hex[:8]}"
    try:
        if remote["kind"] == "file":
            store.download_file(key, tmp / name)
        else:
            store.download_dir(key, tmp / name)
        (tmp / _MANIFEST).write_text(json.dumps({"uri": uri, **remote}, indent=1, sort_keys=True))
        if final.exists():  # a stale copy: move it aside atomically, then drop it
            stale = cache / f".stale-{name}-{digest}-{uuid.uuid4().hex[:8]}"
            os.replace(final, stale)
            shutil.rmtree(stale, ignore_errors=True)
        try:
            os.replace(tmp, final)
        except OSError:
            # Another process (a second rank) put a copy in place first: use it when it matches.
            if _read_manifest(final) is None:
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("staged %s in %s", uri, final / name)
    return final / name


def _read_manifest(folder: Path) -> dict | None:
    try:
        return json.loads((folder / _MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def _remote_listing(store: S3Store, uri: str, key: str) -> dict:
    if key and not uri.endswith("/"):
        head = store._head(key)
        if head is not None:
            name = key.rsplit("/", 1)[-1]
            return {"kind": "file", "objects": {name: {"size": head["ContentLength"],
                                                       "etag": head.get("ETag", "").strip('"')}}}
    objects = store._objects(key, f"staging {uri}")
    if not objects:
        raise StorageError(f"nothing to stage at {uri} (no object and no folder there, endpoint {store.endpoint})")
    return {"kind": "folder", "objects": objects}


__all__ = ["BackgroundUploader", "LocalStore", "S3Store", "Store", "StorageError", "open_store", "parse_s3_uri",
           "stage_s3_uri"]


# ---------------------------------------------------------------------------------------------------------- isolation


def upload_in_child(store: S3Store, local_dir: str | Path, remote_subpath: str, marker: str | None,
                    exclude: tuple[str, ...] = (), nice: int = 19,
                    on_start: Callable[[subprocess.Popen], None] | None = None) -> None:
    """``store.upload_dir`` in a child process at the lowest CPU priority.

    A thread in the training process would share its GIL (boto3 signs, hashes and reads in Python) and its
    cores at equal priority: on a busy machine every step slows down while a checkpoint uploads. A child
    process at nice 19 gets CPU only when training leaves some. Credentials reach it through the inherited
    environment, never the command line; its error comes back as one StorageError line. ``on_start`` gets the
    child (to kill it: the upload then fails as cancelled).
    """
    spec = {"uri": store.uri, "endpoint_url": store._endpoint_url, "region": store._region,
            "workers": store.workers, "max_attempts": store.max_attempts, "timeout": store.timeout,
            "local_dir": str(local_dir), "remote_subpath": remote_subpath, "marker": marker,
            "exclude": list(exclude), "nice": nice}
    # The child lowers its own priority: a preexec_fn would make subprocess fork() the training process,
    # which fails with ENOMEM once that process maps more than the kernel's overcommit heuristic allows
    # (tens of GB of untouched buffers are common); without one, subprocess uses vfork.
    proc = subprocess.Popen([sys.executable, "-m", "lfqa.storage", "upload-dir"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if on_start is not None:
        on_start(proc)
    _, stderr = proc.communicate(json.dumps(spec))
    if proc.returncode < 0:
        raise StorageError(f"upload of {local_dir} to {store.url(remote_subpath)} was stopped "
                           f"(signal {-proc.returncode}); its marker was not written")
    if proc.returncode != 0:
        lines = [line for line in stderr.strip().splitlines() if line.strip()]
        raise StorageError(lines[-1] if lines else f"upload process for {store.url(remote_subpath)} exited "
                           f"with status {proc.returncode}")


def main(argv: list[str] | None = None) -> int:
    """``python -m lfqa.storage upload-dir`` with a JSON spec on standard input (used by upload_in_child)."""
    argv = sys.argv[1:] if argv is None else argv
    if argv != ["upload-dir"]:
        print("usage: python -m lfqa.storage upload-dir < spec.json", file=sys.stderr)
        return 2
    spec = json.loads(sys.stdin.read())
    os.nice(spec.get("nice", 0))
    try:
        store = open_store(spec["uri"], spec["endpoint_url"], spec["region"], spec["workers"],
                           spec.get("max_attempts", DEFAULT_MAX_ATTEMPTS), spec.get("timeout", DEFAULT_TIMEOUT))
        store.upload_dir(spec["local_dir"], spec["remote_subpath"], spec["marker"], exclude=tuple(spec["exclude"]))
    except StorageError as err:
        print(str(err).replace("\n", " "), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
