"""Object storage (s3://, gs://) through one layer: parse URIs, read byte ranges, write whole objects.

Why a layer of our own over obstore (ADR 0012): the engine needs five primitives (size, ranged
read, whole-object write, put-if-absent, list) with errors that name the URI and say what to do.
obstore gives the S3 and GCS clients, the credential chain, signing, multipart upload and retries
with backoff; this module chooses the settings, splits large ranges into concurrent GETs, checks
that every range came back whole, and turns the client's errors into the error types below.

Configuration comes from the standard environment, read by the client when a bucket is first
used: AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN / AWS_REGION, web identity
(AWS_WEB_IDENTITY_TOKEN_FILE + AWS_ROLE_ARN), container and instance credentials, and
AWS_ENDPOINT_URL for an S3-compatible endpoint. A named profile (AWS_PROFILE) goes through boto3's
chain when boto3 is installed. Plain-http endpoints are allowed when the endpoint URL says http://
or AWS_ALLOW_HTTP=true. gs:// uses Google's application-default credentials
(GOOGLE_APPLICATION_CREDENTIALS or the metadata server).
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import obstore
from obstore.exceptions import (
    AlreadyExistsError,
    BaseError,
    NotFoundError,
    PermissionDeniedError,
    PreconditionError,
    UnauthenticatedError,
)
from obstore.store import GCSStore, S3Store

from ..errors import DGRepairError

SCHEMES = ("s3", "gs")
# Where the endpoint is and how to reach it (no secrets): a Ray driver passes these to its actors so
# they read the bucket the plan read. Credentials come from each node's own environment and chain.
ENDPOINT_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ALLOW_HTTP", "AWS_REGION", "AWS_DEFAULT_REGION")
_URI = re.compile(r"^(?P<scheme>s3|gs)://(?P<bucket>[^/]*)(?:/(?P<key>.*))?$")
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9._-]{1,220}[a-z0-9]$")
_BAD_CREDENTIAL_CODES = ("InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken",
                         "TokenRefreshRequired", "InvalidClientTokenId")
# What the client raises for a failed request: its own exceptions, and builtin OSErrors
# (FileNotFoundError for a 404, PermissionError, ConnectionError, TimeoutError).
CLIENT_ERRORS = (BaseError, OSError)
_THROTTLE_MARKERS = ("SlowDown", "503 Service Unavailable", "429 Too Many Requests", "TooManyRequests")


class StorageError(DGRepairError):
    """An object-store request failed; the message names the URI and says what to do."""

    def __init__(self, uri: ObjectURI | str, message: str) -> None:
        super().__init__(f"{uri}: {message}")
        self.uri = str(uri)
        self.detail = message

    def about(self, what: str, instead: str | None = None) -> StorageError:
        """The same error, saying what was being read (`tensor 'x'`) after the URI, optionally with
        a message that fits the caller better than the generic one."""
        message = instead if instead is not None else self.detail
        return type(self)(self.uri, f"{what}: {message}" if what else message)

    def __reduce__(self):
        """Rebuilt from (uri, message), so it crosses from a Ray worker to the driver intact."""
        return type(self), (self.uri, self.detail)


class NoSuchBucket(StorageError):
    """The bucket does not exist (or the endpoint is not the one that holds it)."""


class NoSuchKey(StorageError):
    """The object does not exist under that key."""


class BadCredentials(StorageError):
    """The server rejected the credentials themselves (unknown key, wrong secret, expired token)."""


class AccessDenied(StorageError):
    """The credentials are valid but not allowed to do this on this bucket or prefix."""


class Throttled(StorageError):
    """The server kept answering 503 SlowDown (or 429) after every retry."""


class TruncatedObject(StorageError):
    """A ranged read returned fewer bytes than asked: the object is shorter than its header says."""


@dataclass(frozen=True, order=True)
class ObjectURI:
    """`scheme://bucket/key`; `key` has no leading or trailing slash ("" is the bucket root)."""

    scheme: str
    bucket: str
    key: str

    def __str__(self) -> str:
        return f"{self.scheme}://{self.bucket}/{self.key}"

    def child(self, name: str) -> ObjectURI:
        """The object `name` (a relative path) below this prefix."""
        name = name.strip("/")
        return ObjectURI(self.scheme, self.bucket, f"{self.key}/{name}" if self.key else name)

    def is_within(self, prefix: ObjectURI) -> bool:
        """This URI is `prefix` itself or lies below it."""
        return (self.scheme, self.bucket) == (prefix.scheme, prefix.bucket) and (
            prefix.key == "" or self.key == prefix.key or self.key.startswith(prefix.key + "/"))

    def relative_to(self, prefix: ObjectURI) -> str:
        """This key's path below `prefix` (which must contain it)."""
        if not self.is_within(prefix) or (prefix.key and self.key == prefix.key):
            raise ValueError(f"{self} is not below {prefix}")
        return self.key[len(prefix.key) + 1:] if prefix.key else self.key


def is_object_uri(text: object) -> bool:
    """True for a string that starts with s3:// or gs:// (anything else is a local path or a Hub id)."""
    return isinstance(text, str) and text.split("://", 1)[0] in SCHEMES and "://" in text


def endpoint_env(*specs: object) -> dict[str, str]:
    """The ENDPOINT_ENV variables set here, when any of `specs` is an object-store URI (else none)."""
    if not any(is_object_uri(s) for s in specs):
        return {}
    return {k: os.environ[k] for k in ENDPOINT_ENV if k in os.environ}


def parse_uri(text: str) -> ObjectURI:
    """Parse `s3://bucket/prefix` or `gs://bucket/prefix`; a trailing slash is dropped."""
    m = _URI.match(text)
    if not m:
        raise StorageError(text, "not an object-store URI; write s3://bucket/prefix or gs://bucket/prefix.")
    bucket, key = m["bucket"], (m["key"] or "").strip("/")
    if not _BUCKET.match(bucket):
        raise StorageError(text, f"bucket name {bucket!r} is not valid (3-222 lower-case letters, digits, '.', "
                                 "'-', '_'; it must start and end with a letter or digit).")
    if any(part in ("", ".", "..") for part in key.split("/")) and key:
        raise StorageError(text, "the key has an empty, '.' or '..' segment; write the prefix without them.")
    return ObjectURI(m["scheme"], bucket, key)


@dataclass(frozen=True)
class StoreSettings:
    """How hard to push one endpoint. Frozen: pass a new value to change it."""

    part_bytes: int = 8 << 20        # ranges larger than this are split into concurrent GETs of this size
    concurrency: int = 8             # GETs in flight per read_range call
    max_retries: int = 6             # per request, on 5xx / 429 / connection errors (the client's RetryConfig)
    backoff_initial_s: float = 0.1   # first retry delay; doubles up to backoff_max_s
    backoff_max_s: float = 8.0
    retry_timeout_s: float = 120.0   # give up retrying one request after this long
    multipart_chunk_bytes: int = 16 << 20  # part size of multipart uploads (S3 needs >= 5 MiB)


@dataclass(frozen=True)
class ObjectVersion:
    """One version of an object, for conditional writes: S3 matches the ETag, GCS the generation."""

    e_tag: str | None
    version: str | None = None

    @classmethod
    def of(cls, meta: dict) -> ObjectVersion:
        return cls(meta.get("e_tag"), meta.get("version"))

    def precondition(self) -> dict[str, str]:
        return {k: v for k, v in (("e_tag", self.e_tag), ("version", self.version)) if v is not None}


@dataclass(frozen=True)
class ObjectInfo:
    """One listed (or HEADed) object; `e_tag` names this exact version of its bytes."""

    uri: ObjectURI
    size: int
    e_tag: str | None = None


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


@dataclass
class Storage:
    """Clients for the buckets one run touches, created on first use and shared across threads."""

    settings: StoreSettings = field(default_factory=StoreSettings)
    _stores: dict[tuple[str, str], object] = field(default_factory=dict, init=False, repr=False, compare=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False, compare=False)

    # -- pickling (a RemotePath in a work unit travels to a Ray actor) ---------------------------
    def __getstate__(self) -> dict[str, object]:
        """Only the settings travel: clients and the lock are per process, recreated on first use
        (each reads its credentials and endpoint from the environment of the process that uses it)."""
        return {"settings": self.settings}

    def __setstate__(self, state: dict[str, object]) -> None:
        self.settings = state["settings"]  # type: ignore[assignment]
        self._stores = {}
        self._lock = threading.Lock()

    # -- clients ---------------------------------------------------------------------------------
    def _store(self, uri: ObjectURI):
        with self._lock:
            store = self._stores.get((uri.scheme, uri.bucket))
            if store is None:
                store = self._stores[(uri.scheme, uri.bucket)] = self._make_store(uri)
            return store

    def _make_store(self, uri: ObjectURI):
        s = self.settings
        retry = {"max_retries": s.max_retries, "retry_timeout": timedelta(seconds=s.retry_timeout_s),
                 "backoff": {"init_backoff": timedelta(seconds=s.backoff_initial_s),
                             "max_backoff": timedelta(seconds=s.backoff_max_s), "base": 2}}
        if uri.scheme == "gs":
            return GCSStore(uri.bucket, retry_config=retry)
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or ""
        client = {"allow_http": endpoint.lower().startswith("http://") or _truthy(os.environ.get("AWS_ALLOW_HTTP"))}
        kwargs: dict[str, object] = {}
        if os.environ.get("AWS_PROFILE") and not os.environ.get("AWS_ACCESS_KEY_ID"):
            kwargs["credential_provider"] = _profile_credentials(uri)
        try:
            return S3Store(uri.bucket, client_options=client, retry_config=retry, **kwargs)
        except (*CLIENT_ERRORS, ValueError) as exc:  # obstore's configuration errors
            raise StorageError(uri, f"cannot configure the S3 client ({exc}); check the AWS_* environment.") from exc

    # -- reads -----------------------------------------------------------------------------------
    def size(self, uri: ObjectURI) -> int:
        """The object's length in bytes (one HEAD)."""
        return self.head(uri).size

    def head(self, uri: ObjectURI) -> ObjectInfo:
        """The object's length and ETag (one HEAD)."""
        try:
            meta = obstore.head(self._store(uri), uri.key)
        except CLIENT_ERRORS as exc:  # HEAD errors carry no body: ask once more with a GET to learn why
            raise self._diagnose(uri, exc) from exc
        return ObjectInfo(uri, int(meta["size"]), meta.get("e_tag"))

    def read_range(self, uri: ObjectURI, begin: int, end: int) -> bytearray:
        """Bytes [begin, end) of the object; ranges above part_bytes go out as concurrent GETs."""
        if end < begin or begin < 0:
            raise ValueError(f"bad range [{begin}, {end}) for {uri}")
        out = bytearray(end - begin)
        if end == begin:
            return out
        view = memoryview(out)
        step = self.settings.part_bytes
        parts = [(b, min(b + step, end)) for b in range(begin, end, step)]

        def fetch(part: tuple[int, int]) -> None:
            view[part[0] - begin:part[1] - begin] = self._get_exact(uri, *part)

        if len(parts) == 1:
            fetch(parts[0])
        else:
            with ThreadPoolExecutor(min(self.settings.concurrency, len(parts))) as pool:
                list(pool.map(fetch, parts))
        return out

    def read_object(self, uri: ObjectURI) -> bytes:
        """A whole small object (an index, config.json); large data goes through read_range."""
        return self.read_tagged(uri)[0]

    def read_tagged(self, uri: ObjectURI) -> tuple[bytes, ObjectVersion]:
        """A whole small object and the version read (for a later conditional replace)."""
        try:
            got = obstore.get(self._store(uri), uri.key)
            return bytes(got.bytes()), ObjectVersion.of(got.meta)
        except CLIENT_ERRORS as exc:
            raise self._classify(uri, exc) from exc

    def list(self, prefix: ObjectURI) -> list[ObjectInfo]:
        """Every object below `prefix` (a path prefix: `a/b` lists `a/b/...`, not `a/bc`), sorted by key."""
        found: list[ObjectInfo] = []
        try:
            for batch in obstore.list(self._store(prefix), prefix=prefix.key or None):
                found.extend(ObjectInfo(ObjectURI(prefix.scheme, prefix.bucket, m["path"]), int(m["size"]))
                             for m in batch)
        except CLIENT_ERRORS as exc:
            raise self._classify(prefix, exc) from exc
        return sorted(found, key=lambda o: o.uri.key)

    # -- writes ----------------------------------------------------------------------------------
    def write(self, uri: ObjectURI, data: bytes | Path | Iterable[bytes]) -> str | None:
        """Write a whole object under its final key, visible only when complete: one PUT for bytes
        up to the part size, otherwise a multipart upload that is completed once (and aborted on
        failure), so no reader ever sees a partial object under `uri`. Returns the new ETag."""
        chunk = self.settings.multipart_chunk_bytes
        try:
            return obstore.put(self._store(uri), uri.key, data, chunk_size=chunk,
                               max_concurrency=self.settings.concurrency).get("e_tag")
        except CLIENT_ERRORS as exc:
            raise self._classify(uri, exc) from exc

    def replace_if(self, uri: ObjectURI, data: bytes, seen: ObjectVersion) -> ObjectVersion | None:
        """Overwrite `uri` only if it is still the version `seen` (a conditional PUT: If-Match on S3,
        if-generation-match on GCS). Returns the new version, or None when the object changed
        meanwhile (another writer won)."""
        try:
            return ObjectVersion.of(obstore.put(self._store(uri), uri.key, data, mode=seen.precondition()))
        except (PreconditionError, NotFoundError, FileNotFoundError):
            return None
        except CLIENT_ERRORS as exc:
            if _lost_race(exc):
                return None
            raise self._classify(uri, exc) from exc

    def put_if_absent(self, uri: ObjectURI, data: bytes) -> bool:
        """Create `uri` holding `data` only if no object is there (a conditional PUT, If-None-Match: *).
        True when this call created it, False when an object already existed: the primitive a lock
        on an output prefix needs (exactly one of two racing callers gets True)."""
        return self.create(uri, data) is not None

    def create(self, uri: ObjectURI, data: bytes) -> ObjectVersion | None:
        """put_if_absent that returns the new object's version, or None when an object already existed."""
        try:
            return ObjectVersion.of(obstore.put(self._store(uri), uri.key, data, mode="create"))
        except (AlreadyExistsError, PreconditionError):
            return None
        except CLIENT_ERRORS as exc:
            if _lost_race(exc):
                return None
            raise self._classify(uri, exc) from exc

    def delete(self, uri: ObjectURI) -> None:
        """Delete one object (deleting a missing key is not an error, as in S3)."""
        try:
            obstore.delete(self._store(uri), uri.key)
        except CLIENT_ERRORS as exc:
            raise self._classify(uri, exc) from exc

    # -- errors ----------------------------------------------------------------------------------
    def _get_exact(self, uri: ObjectURI, begin: int, end: int) -> memoryview:
        try:
            got = memoryview(obstore.get_range(self._store(uri), uri.key, start=begin, end=end))
        except CLIENT_ERRORS as exc:
            if "416 Range Not Satisfiable" in str(exc) or "InvalidRange" in str(exc) or "was only" in str(exc):
                raise TruncatedObject(uri, f"bytes [{begin}, {end}) are past the end of the object; it is "
                                           "truncated or not the file its header describes. Re-upload it.") from exc
            raise self._classify(uri, exc) from exc
        if len(got) != end - begin:
            raise TruncatedObject(uri, f"asked for bytes [{begin}, {end}) and got {len(got)} bytes; the object is "
                                       "truncated or not the file its header describes. Re-upload it.")
        return got

    def _diagnose(self, uri: ObjectURI, exc: Exception) -> StorageError:
        """Classify a body-less (HEAD) failure by repeating it as a 1-byte GET, whose error has a code."""
        first = self._classify(uri, exc)
        if "<Code>" in str(exc) or isinstance(first, Throttled):
            return first
        try:
            obstore.get_range(self._store(uri), uri.key, start=0, end=1)
        except CLIENT_ERRORS as again:
            return self._classify(uri, again)
        return first

    def _classify(self, uri: ObjectURI, exc: Exception) -> StorageError:
        """Map a client error to one of our types by its class and the S3/GCS error code in its text."""
        text = str(exc)
        where = f"bucket {uri.bucket!r} at {self._endpoint(uri)}"
        if "NoSuchBucket" in text:
            return NoSuchBucket(uri, f"{where} does not exist; check the bucket name and AWS_ENDPOINT_URL.")
        if isinstance(exc, (NotFoundError, FileNotFoundError)) or "NoSuchKey" in text or "404 Not Found" in text:
            return NoSuchKey(uri, "no such object; check the prefix (keys are case-sensitive).")
        if any(code in text for code in _BAD_CREDENTIAL_CODES) or isinstance(exc, UnauthenticatedError):
            return BadCredentials(uri, f"{where} rejected the credentials (unknown access key, wrong secret or "
                                       "expired token); check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or the "
                                       "profile / role in use.")
        denied = isinstance(exc, (PermissionDeniedError, PermissionError))
        if denied or "AccessDenied" in text or "403 Forbidden" in text:
            return AccessDenied(uri, "access denied: the credentials are valid but may not do this here; grant "
                                     "the role s3:GetObject / s3:PutObject / s3:ListBucket on this prefix.")
        if any(marker in text for marker in _THROTTLE_MARKERS):
            s = self.settings
            return Throttled(uri, f"the server kept answering 503 SlowDown (or 429) through {s.max_retries} "
                                  f"retries with backoff; lower the request rate (fewer workers or "
                                  "concurrency) or retry later.")
        if "error sending request" in text or "Connection refused" in text or "dns error" in text:
            return StorageError(uri, f"cannot reach {self._endpoint(uri)} (after retries); check AWS_ENDPOINT_URL "
                                     "and that the endpoint is up and reachable from this machine.")
        first_line = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
        return StorageError(uri, f"request to {self._endpoint(uri)} failed: {first_line[:400]}")

    @staticmethod
    def _endpoint(uri: ObjectURI) -> str:
        if uri.scheme == "gs":
            return "Google Cloud Storage"
        return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or "AWS S3"


def _lost_race(exc: Exception) -> bool:
    """S3's answer to a conditional PUT while another conditional PUT on the key is in flight."""
    return "ConditionalRequestConflict" in str(exc) or "409 Conflict" in str(exc)


def _profile_credentials(uri: ObjectURI):
    """boto3's credential chain for AWS_PROFILE (shared config, SSO, assume-role), which the Rust
    client does not read itself."""
    try:
        from obstore.auth.boto3 import Boto3CredentialProvider
    except ImportError as exc:  # boto3 missing
        raise StorageError(uri, "AWS_PROFILE is set but boto3 is not installed; `pip install boto3`, or set "
                                "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY instead.") from exc
    return Boto3CredentialProvider()
