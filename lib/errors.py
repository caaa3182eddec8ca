"""Exit codes every job shares, and the errors that carry a user-facing message.

Documented contract (docs/running.md, Kubernetes podFailurePolicy, cloud batch retry rules):
  0  the job finished;
  2  a config or data error: retrying will not help, fix what the message names;
  3  stopped on SIGTERM with its work saved or resumable: retry, it resumes;
  4  out of disk space (or quota): retrying will not help until someone frees space or gives
     the job a bigger volume; the message names the filesystem, the path, the free and the
     needed bytes;
  75 object storage (s3://, gs://) did not answer after its retries: retry later, it resumes
     (EX_TEMPFAIL of sysexits.h: a temporary failure);
  anything else (1, 137 for SIGKILL, ...) is a crash or infrastructure failure: retry.
"""

EXIT_USER_ERROR = 2
EXIT_PREEMPTED = 3
EXIT_DISK_FULL = 4
EXIT_UNAVAILABLE = 75


class UserError(Exception):
    """A problem the user fixes (a flag, a file, a row). The message says what to change."""


class Preempted(Exception):
    """The job saved its state on SIGTERM and stops so that an orchestrator retries it."""


class DiskFull(Exception):
    """A write failed for want of space (ENOSPC, EDQUOT). The message says where and how much."""


class Unavailable(Exception):
    """A store (a bucket) did not answer after the retries: retry the job later, it resumes."""
