"""Object storage (s3://, gs://): opening a URL, retrying what the network breaks, and what each
failure means for the job's exit code.

    data=s3://bucket/prepared/cv_hi         train and eval read a prepared dataset in place
    out=s3://bucket/prepared/cv_hi          prepare writes one there (jobs/prepare.py)

Credentials are never in a URL, a flag or a config: they come from the environment (or the env
file, lib/env.py), where the drivers look for them: AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
AWS_SESSION_TOKEN, AWS_DEFAULT_REGION and, for S3-compatible stores (MinIO, Ceph),
AWS_ENDPOINT_URL or AWS_ENDPOINT_URL_S3; GOOGLE_APPLICATION_CREDENTIALS for gs://. A URL with
credentials in it (s3://KEY:SECRET@bucket/...) is refused, so that none reaches a log line, the
resolved config a job writes, or a manifest.

What a failure means (`call`):
  - refused credentials, a missing bucket: UserError, exit 2 (retrying cannot help), naming the URL;
  - a network error, a timeout, a 5xx answer: retried ATTEMPTS times with exponential backoff
    (BACKOFF_S, 2 x BACKOFF_S, ... : 1 + 2 + 4 + 8 = 15 s in all), each retry logged with the URL
    and the attempt; then Unavailable, exit 75 (lib/errors.py): an orchestrator retries the job,
    which resumes (train from its last checkpoint, prepare from its finished shards);
  - a missing object: FileNotFoundError, for the caller to say which file of the dataset it is.

The drivers' own retries are turned down (s3fs retries=1, botocore max_attempts=1) so that this is
the one retry loop there is, and it logs. Filesystems are made with skip_instance_cache and no
listings cache, and one is dropped after a network error: a store that restarted, or a rerun, is
never answered from a stale listing or a dead connection pool.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TypeVar
from urllib.parse import urlsplit

from lib.errors import Unavailable, UserError

log = logging.getLogger("whisper_ft")
T = TypeVar("T")

ATTEMPTS = 5
"""tries of one operation before the job exits 75 (Unavailable)"""
BACKOFF_S = 1.0
"""seconds before the first retry; doubled for each next one (1, 2, 4, 8)"""
BACKOFF_MAX_S = 30.0
"""the longest single wait"""

BUCKET_PROTOCOLS = ("s3", "s3a", "gs", "gcs")
"""URLs written to by prepare's out= and checked as buckets; other fsspec URLs (file://, memory://)
are read as they are"""

DRIVERS = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs", "abfs": "adlfs"}
"""the package behind each protocol (the image carries s3fs and gcsfs)"""

CREDENTIALS_HINT = {
    "s3": "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (and AWS_ENDPOINT_URL for MinIO or Ceph)",
    "gs": "GOOGLE_APPLICATION_CREDENTIALS",
}


def protocol(url: str) -> str:
    return str(url).split("://", 1)[0].lower() if "://" in str(url) else ""


def is_bucket(url: str) -> bool:
    """True for the object-store URLs this module checks and retries (s3://, gs://)."""
    return protocol(url) in BUCKET_PROTOCOLS


def redact(url: str) -> str:
    """The URL as it may be printed: no user:password@ and no query string (signed URLs)."""
    url = str(url)
    if "://" not in url:
        return url
    parts = urlsplit(url)
    netloc = parts.netloc.rsplit("@", 1)[-1]
    return f"{parts.scheme}://{netloc}{parts.path}"


def check_url(url: str, flag: str) -> None:
    """Refuse a URL that carries credentials (user:secret@, or a signed query): they belong in
    the environment, never in a flag that the resolved config and the logs repeat."""
    if "://" not in str(url):
        return
    parts = urlsplit(str(url))
    if "@" in parts.netloc or parts.query:
        raise UserError(f"{flag}={redact(url)}: the URL carries credentials (user:secret@ or ?query); give the bare "
                        f"URL and put the credentials in the environment or the env file ({hint(url)})")


def hint(url: str) -> str:
    p = protocol(url)
    return CREDENTIALS_HINT["gs" if p in ("gs", "gcs") else "s3"]


def bucket_of(url: str) -> str:
    """s3://bucket/a/b -> s3://bucket"""
    parts = urlsplit(str(url))
    return f"{parts.scheme}://{parts.netloc.rsplit('@', 1)[-1]}"


# ---------------------------------------------------------------- filesystems

_FS: dict[tuple, object] = {}
ENV_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL",
            "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION", "AWS_REGION", "AWS_PROFILE", "GOOGLE_APPLICATION_CREDENTIALS")
"""what the drivers read from the environment: a filesystem is kept only while these stay the same"""


def _key(url: str) -> tuple:
    """One filesystem per process (s3fs's are not fork-safe: a DataLoader worker forked after the
    main process opened the manifest makes its own), protocol and credentials."""
    import os

    return (os.getpid(), protocol(url), *(os.environ.get(k) for k in ENV_KEYS))


def _options(proto: str) -> dict:
    if proto in ("s3", "s3a"):
        # botocore: one attempt per call, short connect timeout; call() does the retrying
        return {"skip_instance_cache": True, "use_listings_cache": False,
                "config_kwargs": {"retries": {"max_attempts": 1, "mode": "standard"}, "connect_timeout": 5,
                                  "read_timeout": 60}}
    if proto in ("gs", "gcs"):
        return {"skip_instance_cache": True, "use_listings_cache": False}
    return {}


def filesystem(url: str):
    """(fsspec filesystem, path) of a URL; one filesystem per protocol in this process, made anew
    after a network error (forget). A protocol whose driver is not installed is a UserError naming
    the package."""
    import fsspec

    proto = protocol(url)
    fs = _FS.get(_key(url))
    try:
        if fs is None:
            fs = fsspec.filesystem(proto, **_options(proto))
            if proto in ("s3", "s3a"):
                fs.retries = 1  # s3fs's own retry loop (5 tries, silent) off: call() retries and logs
            _FS[_key(url)] = fs
        return fs, fs._strip_protocol(url)
    except (ImportError, ValueError) as e:
        pkg = DRIVERS.get(proto)
        fix = f"`pip install {pkg}` in the image or venv" if pkg else "check the URL's protocol"
        raise UserError(f"{redact(url)}: cannot open {proto}:// URLs here ({str(e).splitlines()[0][:120]}); "
                        f"{fix}") from None


def forget(url: str) -> None:
    """Drop the protocol's filesystem: the next call makes a new client and connection pool."""
    _FS.pop(_key(url), None)


# ---------------------------------------------------------------- what an error means


def _retryable(e: BaseException) -> bool:
    """A failure that another try may not meet: the network, a timeout, the store's 5xx."""
    if isinstance(e, (FileNotFoundError, PermissionError, FileExistsError, IsADirectoryError, NotADirectoryError,
                      UserError)):
        return False
    if isinstance(e, (ConnectionError, TimeoutError)):
        return True
    try:
        from botocore.exceptions import BotoCoreError, NoCredentialsError, PartialCredentialsError

        if isinstance(e, (NoCredentialsError, PartialCredentialsError)):
            return False
        if isinstance(e, BotoCoreError):
            return True
    except ImportError:
        pass
    try:
        import aiohttp

        if isinstance(e, aiohttp.ClientError):
            return True
    except ImportError:
        pass
    status = getattr(e, "code", None) or getattr(e, "status", None)  # gcsfs HttpError
    if isinstance(status, int):
        return status >= 500 or status in (408, 429)
    # s3fs turns the store's InternalError / ServiceUnavailable / SlowDown into OSError(EREMOTEIO, ...)
    return type(e) is OSError


def _denied(e: BaseException) -> bool:
    if isinstance(e, PermissionError):
        return True
    try:
        from botocore.exceptions import NoCredentialsError, PartialCredentialsError

        if isinstance(e, (NoCredentialsError, PartialCredentialsError)):
            return True
    except ImportError:
        pass
    status = getattr(e, "code", None) or getattr(e, "status", None)
    return status in (401, 403)


def _short(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"


def call(url: str, what: str, fn: Callable[[], T]) -> T:
    """fn() (an operation on `url`), retried on network errors with backoff; refused credentials
    become a UserError naming the URL; after ATTEMPTS tries, Unavailable (exit 75)."""
    for attempt in range(1, ATTEMPTS + 1):
        try:
            return fn()
        except Exception as e:
            if _denied(e):
                raise UserError(f"{redact(url)}: access denied while trying to {what} ({_short(e)}): check the "
                                f"credentials in the environment or the env file ({hint(url)}) and that they "
                                f"grant this access to {redact(bucket_of(url))}") from None
            if not _retryable(e) or not is_bucket(url):
                raise
            forget(url)
            if attempt == ATTEMPTS:
                raise Unavailable(f"{redact(url)}: could not {what} after {ATTEMPTS} attempts ({_short(e)}); the "
                                  f"store did not answer: retry the job later (it resumes: finished work is kept), "
                                  f"and check the endpoint and the network") from None
            wait = min(BACKOFF_MAX_S, BACKOFF_S * 2 ** (attempt - 1))
            log.warning("storage: %s: %s failed (attempt %d of %d: %s); retrying in %.1f s", redact(url), what,
                        attempt, ATTEMPTS, _short(e), wait)
            time.sleep(wait)
    raise AssertionError("unreachable")


def check_bucket(url: str, flag: str, write: bool = False) -> None:
    """Before any work: the URL has no credentials in it, its bucket exists and the credentials
    open it (one request). A missing bucket or refused credentials: exit 2 naming the URL."""
    check_url(url, flag)
    if not is_bucket(url):
        return
    root = bucket_of(url)
    fs, path = filesystem(root)

    def look():
        try:
            return fs.info(path)
        except FileNotFoundError:
            raise UserError(f"{flag}={redact(url)}: the bucket {redact(root)} does not exist (or these credentials "
                            f"cannot see it): create it{' before preparing into it' if write else ''}, or fix "
                            f"the URL") from None

    call(url, f"{'write' if write else 'read'} the bucket {redact(root)}", look)


# ---------------------------------------------------------------- operations


def read_bytes(url: str, what: str = "read") -> bytes:
    """A whole object; FileNotFoundError if there is none."""
    path = filesystem(url)[1]
    return call(url, what, lambda: filesystem(url)[0].cat_file(path))


def write_bytes(url: str, data: bytes, what: str = "write") -> None:
    """One object in one request: under its name it is either absent or whole (S3 and GCS never
    show a half-written object)."""
    path = filesystem(url)[1]
    call(url, what, lambda: filesystem(url)[0].pipe_file(path, data))


def upload(local, url: str, what: str = "upload") -> None:
    """A local file to `url` (a multipart upload for a large one, which the store shows only once complete)."""
    path = filesystem(url)[1]
    call(url, what, lambda: filesystem(url)[0].put_file(str(local), path))


def download(url: str, local, what: str = "download") -> None:
    path = filesystem(url)[1]
    call(url, what, lambda: filesystem(url)[0].get_file(path, str(local)))


def sizes(url: str, what: str = "list") -> dict[str, int]:
    """{name: bytes} of the objects directly under the prefix `url` ({} when there are none)."""
    path = filesystem(url)[1]

    def ls():
        try:
            entries = filesystem(url)[0].ls(path, detail=True)
        except FileNotFoundError:
            return {}
        return {e["name"].rstrip("/").rsplit("/", 1)[-1]: int(e.get("size") or 0) for e in entries
                if e.get("type") != "directory"}

    return call(url, what, ls)


def remove(urls: list[str], what: str = "delete") -> None:
    """Delete objects (those already gone are fine)."""
    if not urls:
        return
    paths = [filesystem(u)[1] for u in urls]

    def rm():
        fs_now = filesystem(urls[0])[0]
        for p in paths:
            try:
                fs_now.rm_file(p)
            except FileNotFoundError:
                pass

    call(urls[0], what, rm)
