"""Exit codes every job shares, and the error that carries a user-facing message.

Documented contract (docs/running.md, Kubernetes podFailurePolicy, cloud batch retry rules):
  0  the job finished;
  2  a config or data error: retrying will not help, fix what the message names;
  3  stopped on SIGTERM after saving a checkpoint: retry, it resumes;
  75 object storage (s3://, gs://) did not answer after its retries: retry later, it resumes
     (EX_TEMPFAIL of sysexits.h: a temporary failure);
  anything else (1, 137 for SIGKILL, ...) is a crash or infrastructure failure: retry.
"""

EXIT_USER_ERROR = 2
EXIT_PREEMPTED = 3
EXIT_UNAVAILABLE = 75


class UserError(Exception):
    """A problem the user fixes (a flag, a file, a row). The message says what to change."""


class Preempted(Exception):
    """The job saved its state on SIGTERM and stops so that an orchestrator retries it."""


class Unavailable(Exception):
    """A store (a bucket) did not answer after the retries: retry the job later, it resumes."""
