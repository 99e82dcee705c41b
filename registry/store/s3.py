"""Blobs as objects in an S3-compatible bucket: ``s3://BUCKET/PREFIX/sha256/ab/cdef...``.

Selected with ``PEM_STORE=s3://BUCKET/PREFIX``. The client comes from boto3's default chain
(environment, ``~/.aws`` files, instance roles); ``PEM_S3_ENDPOINT_URL`` points it at a
non-AWS service (MinIO, R2, Ceph), with path-style addressing. boto3 is imported on first
use, so opening a registry (``pem list``) never pays for it.

Writing: the bytes go to a local temporary file in the cache folder and are hashed on the
way; :meth:`S3BlobWriter.commit` uploads that file under its digest with a conditional put
(``If-None-Match: *``, a multipart upload above :attr:`S3BlobStore.multipart_threshold`).
An object is never overwritten: when the key exists, or the conditional put fails with 412
because another writer stored the same digest first, the existing object stands (content
addressing). ``commit`` returns only after the bucket acknowledged the object, and the catalog
commits its row after that. The uploaded file then becomes the cached copy.

Reading: :meth:`S3BlobStore.local_path` returns a file of the local read cache
(:mod:`registry.store.cache`), downloading and checking the blob on first use.

Every failure of the service (unreachable endpoint, missing bucket, denied access, the
connection lost mid-transfer) is a one-line :class:`BlobStoreError` naming the bucket and
endpoint, with the fix.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from registry import faults
from registry.config import ENV_S3_ENDPOINT_URL, ENV_STORE
from registry.errors import BlobStoreError
from registry.safetensors_io import HashingWriter
from registry.store.base import BlobStore, BlobWriter
from registry.store.cache import BlobCache, CacheInfo

MiB = 1024 * 1024
MULTIPART_THRESHOLD = 64 * MiB  # larger blobs are uploaded in parts
PART_SIZE = 64 * MiB  # S3 allows 10,000 parts: blobs up to 625 GiB
DOWNLOAD_CHUNK = 8 * MiB

_DENIED = {"AccessDenied", "403", "Forbidden", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken",
           "InvalidToken", "TokenRefreshRequired", "AllAccessDisabled", "AccountProblem"}
_NO_BUCKET = {"NoSuchBucket"}
_NOT_FOUND = {"404", "NoSuchKey", "NotFound"}
_PRECONDITION = {"412", "PreconditionFailed"}
_CONDITIONAL_UNSUPPORTED = {"NotImplemented", "501"}
_CONFLICT = {"ConditionalRequestConflict", "409"}  # S3: a concurrent conditional write of the same key


def parse_location(location: str) -> tuple[str, str]:
    """``s3://BUCKET/PRE/FIX`` -> ("BUCKET", "PRE/FIX") (the prefix without slashes at its ends)."""
    rest = location.removeprefix("s3://")
    bucket, _, prefix = rest.partition("/")
    return bucket, prefix.strip("/")


def _code(exc: Any) -> str:
    error = getattr(exc, "response", {}).get("Error", {})
    status = getattr(exc, "response", {}).get("ResponseMetadata", {}).get("HTTPStatusCode")
    return str(error.get("Code") or status or "")


class S3BlobWriter(BlobWriter):
    def __init__(self, store: "S3BlobStore"):
        self._store = store
        tmp_path = store.cache.new_temporary("incoming-")
        super().__init__(tmp_path, open(tmp_path, "wb"))

    def commit(self) -> str:
        digest = self.sink.hexdigest()
        self._file.close()
        faults.point("blob-written")
        self._store._upload(self._tmp_path, digest)  # durable in the bucket when this returns
        self._done = True
        try:
            self._store.cache.insert(self._tmp_path, digest)  # we hashed these bytes: a verified copy
        except OSError:  # the cache is only a cache
            self._tmp_path.unlink(missing_ok=True)
        faults.point("blob-stored")
        return digest


class S3BlobStore(BlobStore):
    def __init__(
        self,
        bucket: str,
        prefix: str,
        cache: BlobCache,
        *,
        endpoint_url: str | None = None,
        multipart_threshold: int = MULTIPART_THRESHOLD,
        part_size: int = PART_SIZE,
    ):
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.location = f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}"
        self.cache = cache
        self.endpoint_url = endpoint_url
        self.multipart_threshold = multipart_threshold
        self.part_size = part_size
        self._client: Any = None
        self._bucket_checked = False

    # --- the client and its errors ---------------------------------------------------------

    @property
    def client(self) -> Any:
        if self._client is None:
            import boto3
            from botocore.config import Config

            options: dict[str, Any] = {"connect_timeout": 10}
            if self.endpoint_url:  # MinIO, Ceph and co. do not all resolve virtual-hosted buckets
                options["s3"] = {"addressing_style": "path"}
            session = boto3.session.Session()
            try:
                self._client = session.client("s3", endpoint_url=self.endpoint_url, config=Config(**options))
            except ValueError as exc:  # a malformed endpoint URL
                raise BlobStoreError(f"{ENV_S3_ENDPOINT_URL}={self.endpoint_url!r} is not a usable URL: {exc}") from None
        return self._client

    @property
    def endpoint(self) -> str:
        if self._client is not None:
            return str(self._client.meta.endpoint_url)
        return self.endpoint_url or "AWS S3"

    def key(self, digest: str) -> str:
        return f"{self.prefix}/sha256/{digest[:2]}/{digest[2:]}" if self.prefix else f"sha256/{digest[:2]}/{digest[2:]}"

    def _translate(self, exc: Exception, doing: str) -> BlobStoreError:
        """A one-line error for a boto3 failure, naming the bucket and endpoint, with the fix."""
        from botocore import exceptions as bx

        where = f"{self.location} at {self.endpoint}"
        if isinstance(exc, (bx.NoCredentialsError, bx.PartialCredentialsError)):
            return BlobStoreError(
                f"no usable AWS credentials for {self.location} ({doing}): set AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY, or AWS_PROFILE"
            )
        if isinstance(exc, (bx.ConnectionError, bx.HTTPClientError)):
            return BlobStoreError(
                f"cannot reach the S3 endpoint {self.endpoint} for bucket {self.bucket} ({doing}: "
                f"{exc.__class__.__name__}): check that the service is running and {ENV_S3_ENDPOINT_URL}"
            )
        if isinstance(exc, bx.ClientError):
            code = _code(exc)
            if code in _NO_BUCKET:
                return BlobStoreError(
                    f"the bucket {self.bucket!r} does not exist at {self.endpoint} ({doing}): create it, or fix "
                    f"{ENV_STORE}={self.location}"
                )
            if code in _DENIED:
                return BlobStoreError(
                    f"access to {where} denied ({code}, {doing}): check the credentials (AWS_ACCESS_KEY_ID/"
                    "AWS_PROFILE) and that they may list, get, put and delete objects in the bucket"
                )
            if code in ("PermanentRedirect", "301", "AuthorizationHeaderMalformed"):
                return BlobStoreError(
                    f"the bucket {self.bucket!r} is in another region ({code}, {doing}): set AWS_REGION to its region"
                )
            message = str(exc.response.get("Error", {}).get("Message") or exc).splitlines()[0]
            return BlobStoreError(f"S3 error on {where} ({doing}): {code}: {message}")
        if isinstance(exc, bx.BotoCoreError):
            return BlobStoreError(f"S3 error on {where} ({doing}): {str(exc).splitlines()[0]}")
        raise exc

    @contextmanager
    def _s3(self, doing: str) -> Iterator[None]:
        """Turns boto3's exceptions into BlobStoreError."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            yield
        except (BotoCoreError, ClientError) as exc:
            raise self._translate(exc, doing) from None

    def _head(self, digest: str) -> dict[str, Any] | None:
        """The object's metadata, or None when it is not in the bucket."""
        from botocore.exceptions import ClientError

        with self._s3(f"looking up sha256:{digest[:12]}"):
            try:
                return self.client.head_object(Bucket=self.bucket, Key=self.key(digest))
            except ClientError as exc:
                if _code(exc) not in _NOT_FOUND:
                    raise
        if not self._bucket_checked:  # HEAD says 404 for a missing bucket too: tell them apart
            self.check()
        return None

    def check(self) -> None:
        with self._s3("checking the bucket"):
            try:
                self.client.head_bucket(Bucket=self.bucket)
            except Exception as exc:
                if _code(exc) in _NOT_FOUND:
                    raise BlobStoreError(
                        f"the bucket {self.bucket!r} does not exist at {self.endpoint}: create it, or fix "
                        f"{ENV_STORE}={self.location}"
                    ) from None
                raise
        self._bucket_checked = True

    # --- writing ---------------------------------------------------------------------------

    def writer(self) -> S3BlobWriter:
        return S3BlobWriter(self)

    def _upload(self, path: Path, digest: str) -> None:
        """Store the file at ``path`` as the object of ``digest`` unless the bucket has it."""
        if self._head(digest) is not None:
            return  # content addressing: the same bytes are there already
        size = path.stat().st_size
        with self._s3(f"storing sha256:{digest[:12]}"):
            if size > self.multipart_threshold:
                self._put_multipart(path, digest)
            else:
                self._put(path, digest)

    def _put(self, path: Path, digest: str) -> None:
        from botocore.exceptions import ClientError

        with open(path, "rb") as body:
            try:
                self.client.put_object(Bucket=self.bucket, Key=self.key(digest), Body=body, IfNoneMatch="*")
            except ClientError as exc:
                code = _code(exc)
                if code in _PRECONDITION or (code in _CONFLICT and self._head(digest) is not None):
                    return  # another writer stored the same digest first
                if code not in _CONDITIONAL_UNSUPPORTED:
                    raise
                # A service without conditional writes: we checked the key just before, and the
                # same digest has the same bytes, so a racing overwrite changes nothing.
                body.seek(0)
                self.client.put_object(Bucket=self.bucket, Key=self.key(digest), Body=body)

    def _put_multipart(self, path: Path, digest: str) -> None:
        from botocore.exceptions import ClientError

        key = self.key(digest)
        upload_id = self.client.create_multipart_upload(Bucket=self.bucket, Key=key)["UploadId"]
        try:
            parts = []
            with open(path, "rb") as f:
                number = 1
                while chunk := f.read(self.part_size):
                    answer = self.client.upload_part(
                        Bucket=self.bucket, Key=key, UploadId=upload_id, PartNumber=number, Body=chunk
                    )
                    parts.append({"ETag": answer["ETag"], "PartNumber": number})
                    number += 1
            done = {"Bucket": self.bucket, "Key": key, "UploadId": upload_id, "MultipartUpload": {"Parts": parts}}
            try:
                self.client.complete_multipart_upload(**done, IfNoneMatch="*")
            except ClientError as exc:
                code = _code(exc)
                if code in _PRECONDITION or (code in _CONFLICT and self._head(digest) is not None):
                    self._abort_multipart(key, upload_id)
                    return  # another writer stored the same digest first
                if code not in _CONDITIONAL_UNSUPPORTED:
                    raise
                if self._head(digest) is not None:
                    self._abort_multipart(key, upload_id)
                    return
                self.client.complete_multipart_upload(**done)
        except BaseException:
            self._abort_multipart(key, upload_id)
            raise

    def _abort_multipart(self, key: str, upload_id: str) -> None:
        """Best effort: an upload that cannot be aborted (the service is gone) stays listed by
        ``list_multipart_uploads`` until a bucket lifecycle rule removes it."""
        try:
            self.client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)
        except Exception:
            pass

    # --- reading ---------------------------------------------------------------------------

    def exists(self, digest: str) -> bool:
        return self._head(digest) is not None

    def local_path(self, digest: str, verified: bool = True) -> Path:
        cached = self.cache.lookup(digest, check=verified)
        if cached is not None:
            return cached
        return self.cache.fetch(digest, lambda sink: self._download(digest, sink), self.location)

    def _download(self, digest: str, sink: HashingWriter) -> None:
        from botocore.exceptions import ClientError

        with self._s3(f"downloading sha256:{digest[:12]}"):
            try:
                answer = self.client.get_object(Bucket=self.bucket, Key=self.key(digest))
            except ClientError as exc:
                code = _code(exc)
                if code in ("NoSuchKey", "NotFound") or (code == "404" and self._head(digest) is None):
                    raise BlobStoreError(
                        f"blob sha256:{digest} is missing from {self.location}: run `pem verify --all`"
                    ) from None
                raise
            expected = answer.get("ContentLength")
            for chunk in answer["Body"].iter_chunks(DOWNLOAD_CHUNK):
                sink.write(chunk)
        if expected is not None and sink.bytes_written != expected:
            raise BlobStoreError(
                f"the download of sha256:{digest[:12]} from {self.location} stopped after {sink.bytes_written} "
                f"of {expected} bytes: try again"
            )

    refetches_damaged = True

    def corrupt_hint(self, digest: str) -> str:
        self.cache.discard(digest)  # the next read downloads it again
        return "its damaged cached copy was removed: run the command again (`pem verify` checks the bucket)"

    def size(self, digest: str) -> int:
        head = self._head(digest)
        if head is None:
            raise BlobStoreError(f"blob sha256:{digest} is missing from {self.location}: run `pem verify --all`")
        return int(head["ContentLength"])

    def modified_at(self, digest: str) -> float:
        head = self._head(digest)
        if head is None:
            raise BlobStoreError(f"blob sha256:{digest} is missing from {self.location}: run `pem verify --all`")
        return head["LastModified"].timestamp()

    def digests(self) -> Iterator[str]:
        base = f"{self.prefix}/sha256/" if self.prefix else "sha256/"
        with self._s3("listing the blobs"):
            pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=base)
            for page in pages:
                for item in page.get("Contents", ()):
                    rest = item["Key"][len(base):]
                    fan, _, name = rest.partition("/")
                    digest = fan + name
                    if len(fan) == 2 and len(digest) == 64 and all(c in "0123456789abcdef" for c in digest):
                        yield digest

    # --- removing --------------------------------------------------------------------------

    def delete(self, digest: str) -> None:
        with self._s3(f"deleting sha256:{digest[:12]}"):
            self.client.delete_object(Bucket=self.bucket, Key=self.key(digest))
        self.cache.discard(digest)

    def temporary_files(self) -> Iterator[tuple[Path, float]]:
        """Local leftovers of crashed writers and downloads (in the cache's tmp folder).
        Multipart uploads abandoned in the bucket are not listed: a lifecycle rule
        (AbortIncompleteMultipartUpload) removes them."""
        return self.cache.temporary_files()

    # --- the cache -------------------------------------------------------------------------

    def cache_info(self) -> CacheInfo:
        return self.cache.info()

    def cache_clear(self) -> CacheInfo:
        return self.cache.clear()


def open_s3_store(location: str, home: Path) -> S3BlobStore:
    from registry.config import CACHE_DIRNAME, cache_size_limit, s3_endpoint_url

    bucket, prefix = parse_location(location)
    cache = BlobCache(home / CACHE_DIRNAME, cache_size_limit())
    return S3BlobStore(bucket, prefix, cache, endpoint_url=s3_endpoint_url())


__all__ = ["S3BlobStore", "S3BlobWriter", "open_s3_store", "parse_location"]
