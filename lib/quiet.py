"""Library warnings that mean nothing to a user of these jobs, silenced where they start.

Each entry says why it does not matter here; every other warning still shows. run_job
installs them through lib/__init__.py, so before any submodule imports transformers or
bitsandbytes (the kernels-community message fires while bitsandbytes is imported). tests/foundation/test_quiet.py triggers each through
the real library call and checks that it is gone, so a message that changes wording shows up
as a failing test rather than as noise again.
"""

from __future__ import annotations

import logging
import warnings

# (category, message regex, module regex, why it does not matter)
WARNINGS = [
    (FutureWarning, r"`is_gradient_checkpointing` is deprecated", r"transformers\.modeling_utils",
     "PEFT (get_peft_model, PeftModel.from_pretrained) reads the deprecated property; our code "
     "uses is_activation_checkpointing, and the property works until transformers 6, which the "
     "lock does not allow without a re-pin and the test suite"),
]

# (logger name, message start, why): records dropped at the logger, before any handler.
LOG_RECORDS = [
    ("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward from kernels-community",
     "on CPUs with AVX512-BF16, bitsandbytes tries to fetch an optional faster 4-bit CPU kernel "
     "from the Hub through the `kernels` package; jobs never download code, and without it "
     "bitsandbytes uses its built-in CPU path (same results). Only NF4 on a CPU is affected"),
    ("transformers.generation.utils", "Passing `generation_config` together with generation-related",
     "Whisper's own generate() (WhisperGenerationMixin) passes suppress_tokens and "
     "begin_suppress_tokens beside the generation config: nothing a caller can change"),
    ("transformers.generation.utils", "The attention mask is not set with a batched input",
     "Whisper's encoder input is log-mel padded to 30-s windows, the padding it was trained on, and "
     "every clip's decoder prompt is the same 4 tokens, so no batch holds a padded position to mask"),
    ("botocore.credentials", "Found credentials in",
     "logged at INFO each time a bucket's client is made (lib/dataset/bucket.py makes one again after a "
     "network error); the job's start already says which AWS_* keys are set (Env.describe)"),
    ("aiobotocore.credentials", "Found credentials in", "the same line from the async client that s3fs uses (aiobotocore)"),
    ("botocore.configprovider", "Found endpoint for",
     "the same for AWS_ENDPOINT_URL, which the job's start line shows (without credentials)"),
]


class _DropRecords(logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


def install() -> None:
    """Apply WARNINGS and LOG_RECORDS to this process (idempotent)."""
    for category, message, module, _why in WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
    for name, prefix, _why in LOG_RECORDS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropRecords) and f.prefix == prefix for f in logger.filters):
            logger.addFilter(_DropRecords(prefix))
