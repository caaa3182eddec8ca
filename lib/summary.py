"""The short summary every job ends with: where its outputs are and the numbers that matter.

    == train done in 2 min 13 s
       outputs     data/runs/hi-1 (adapter/, checkpoints/, metrics.json, tb/)
       best WER    23.40 % normalized (checkpoint-1200), 31.02 % exact text
       next        make eval RUN=hi-1 RUNNER=local

Printed to stderr after the logs (transcribe's stdout stays the transcript alone), without the
log's timestamps, so that the last lines on the screen answer "what did it do, where is it".
run_job marks the start (mark_start); a job calls done() as its last step. A `next` line is a
command to copy: make_hint() adds RUNNER=local (and DATA_DIR=) when the job itself was started by
`make ... RUNNER=local` (lib/env.py Env.make_flags), so that the copy runs where this job ran.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

_started: float | None = None


def mark_start() -> None:
    global _started
    _started = time.monotonic()


def elapsed(seconds: float) -> str:
    """12.3 s, 2 min 13 s, 1 h 04 min."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    if seconds < 3600:
        return f"{int(seconds // 60)} min {int(seconds % 60):02d} s"
    return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60):02d} min"


def percent(x: float | None, scale: float = 1.0) -> str:
    """A WER as the summary shows it: 0.234 (scale 100) or 23.4 (scale 1) -> '23.40 %'; None -> 'n/a'."""
    return "n/a" if x is None else f"{scale * x:.2f} %"


def make_hint(target: str, *args: str, env=None) -> str:
    """`make TARGET ARGS...` as the next command to type, with env.make_flags() (RUNNER=local ...)."""
    return " ".join(["make", target, *args, *(env.make_flags() if env is not None else [])])


def format_summary(job: str, lines: dict[str, Any], seconds: float | None = None) -> str:
    """The block: a title line, then one `name  value` line each (a Path is shown as given)."""
    head = f"== {job} done" + (f" in {elapsed(seconds)}" if seconds is not None else "")
    lines = {k: v for k, v in lines.items() if v is not None}
    width = max((len(k) for k in lines), default=0)
    return "\n".join([head, *(f"   {k:<{width}}  {v}" for k, v in lines.items())])


def done(job: str, lines: dict[str, Any], stream=None) -> str:
    """Print the job's summary (see the module docstring) and return it."""
    text = format_summary(job, {k: str(v) if isinstance(v, Path) else v for k, v in lines.items()},
                          time.monotonic() - _started if _started is not None else None)
    stream = stream or sys.stderr
    print("\n" + text, file=stream, flush=True)
    return text


def prepare_summary(out: Path, manifest: dict[str, Any], env=None) -> dict[str, Any]:
    """prepare's lines: the folder, rows and hours per split, the storage (MB per audio hour, the
    PCM codec), what was skipped, and the train command (make_hint: `env` says where the job ran)."""
    lines: dict[str, Any] = {"outputs": f"{out} (manifest.json lists every skipped row and why)"}
    for split, info in manifest.get("splits", {}).items():
        lines[split] = (f"{info['rows']} rows, {info['hours']:.3f} h"
                        + (f" ({info['rows_read']} read, {info['skipped']} skipped)" if "rows_read" in info else "")
                        + (f", {info['segment_rows']} with segments" if info.get("segment_rows") else ""))
    st = manifest.get("storage") or {}
    if "bytes_per_audio_hour" in st:
        lines["storage"] = (f"{st['bytes_per_audio_hour'] / 1e6:.1f} MB per audio hour"
                            + (f", PCM sources as {st['pcm_storage']}" if st.get("pcm_storage") else ""))
    reasons = manifest.get("skipped_by_reason") or {}
    lines["skipped"] = ", ".join(f"{n} {why}" for why, n in reasons.items()) or "none"
    # a bucket's dataset is read where it is: data=<its URL>
    data = str(out) if "://" in str(out) else manifest.get("name", Path(out).name)
    lines["next"] = make_hint("train", f"DATA={data}", "RUN=<name>", env=env)
    return lines


def export_summary(out: Path, manifest: dict[str, Any], env=None) -> dict[str, Any]:
    """export's lines: the merged model (and CTranslate2 copy), how it compares with base + adapter,
    and the command that transcribes with it (make_hint: `env` says where the job ran)."""
    v, ct2 = manifest.get("verify"), manifest.get("ctranslate2")
    return {
        "merged": f"{out} ({manifest.get('dtype')})",
        "check": (f"{v['identical']} of {v['clips']} transcripts identical to base + adapter, "
                  f"WER between them {percent(v['wer_vs_reference'], 100)}") if v else "not checked (verify_clips=0)",
        "ctranslate2": ct2["path"] if ct2 else None,
        "hub": manifest.get("hub"),
        "next": make_hint("transcribe", f'ARGS="model={out} audio=FILE"', env=env),
    }
