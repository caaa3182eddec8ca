"""A page to try a run in the browser: one clip through the base and the fine-tune, side by side.

    python -m jobs.serve run=hi-small                          # http://127.0.0.1:7860
    python -m jobs.serve run=hi-small base=openai/whisper-small port=8080 language=hi
    make serve RUN=hi-small                                    # in the image, on 127.0.0.1:7860

Upload or record a clip and press Transcribe: the base's transcript and the fine-tune's (base +
DATA_DIR/runs/RUN/adapter), each with its decode time, decoded as `make transcribe` decodes.
Below: the run's eval report table (`make eval` writes it) and its training curves. A run that
has no adapter yet serves its base alone and says so. Ctrl-C stops it. Nothing leaves the
machine: no analytics, no share link (lib/serve/page.py).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from lib import summary
from lib.cli import run_job
from lib.decoding import DecodeConfig, load_for_decoding
from lib.env import Env
from lib.errors import UserError

log = logging.getLogger("whisper_ft")


@dataclass
class ServeConfig(DecodeConfig):
    """`make serve`: language=, task=, precision=, quantization=, max_new_tokens= and the no-speech
    gate as transcribe applies them (lib.decoding.DecodeConfig), then these."""

    run: str | None = None
    """run name: DATA_DIR/runs/RUN (its adapter/, eval/report.json and log_history.json)"""
    base: str | None = None
    """the base model (folder or Hub id); default: the run's config.yaml model.base"""
    host: str = "127.0.0.1"
    """address the page listens on: 127.0.0.1 (this machine only) or 0.0.0.0 (every interface: what
    a container needs; `make serve` publishes it on the host's 127.0.0.1 only)"""
    port: int = 7860
    """TCP port of the page (7860: Gradio's usual)"""

    def __post_init__(self):
        if not self.run:
            raise UserError("which run? set run=NAME (a folder under DATA_DIR/runs, as `make train RUN=NAME` wrote)")
        if not 1 <= self.port <= 65535:
            raise UserError(f"port={self.port}: use a TCP port 1..65535 (default 7860)")
        super().__post_init__()  # max_new_tokens and the no-speech gate (lib.decoding.DecodeConfig)


def main(cfg: ServeConfig, env: Env) -> None:
    from lib.serve import page as serve

    # 1. The run, its base and its adapter (or why it has none yet), before any weights load.
    source, note = serve.resolve_run(env, cfg.run, cfg.base)

    # 2. The base and the adapter, loaded once; language and task resolved as transcribe does.
    model, processor, info, language, task = load_for_decoding(cfg, source, env.hf_token)
    served = serve.Served(model, processor, language, task, cfg.max_new_tokens, source.base, cfg.run,
                          has_adapter=source.adapter is not None, note=note, gate=cfg.gate())
    log.info("serve: run %s with %s, language %s, task %s, %s", cfg.run, source.describe(), language, task, info)

    # 3. What the page shows under the transcripts: the eval report's table, the training curves.
    # One folder for everything the page writes (curves, and Gradio's copies of each upload, which
    # it would otherwise leave in /tmp/gradio for good: 150 MB after an afternoon of clips),
    # deleted when the page stops.
    workdir = Path(tempfile.mkdtemp(prefix="whisper-serve-"))
    os.environ["GRADIO_TEMP_DIR"] = str(workdir / "uploads")  # read when Gradio is imported (build_page)
    try:
        report_md = serve.report_section(cfg.run, source.run_dir)
        curves, caption = serve.training_curves(source.run_dir, workdir)

        # 4. The page, until Ctrl-C.
        page = serve.build_page(served, report_md, curves, caption)
        url = f"http://{'127.0.0.1' if cfg.host in ('0.0.0.0', '::') else cfg.host}:{cfg.port}"
        log.info("serve: open %s (listening on %s:%d; Ctrl-C stops it)", url, cfg.host, cfg.port)
        serve.launch(page, cfg.host, cfg.port)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    summary.done("serve", {"page": f"{url} (stopped)", "model": source.describe(),
                           "report": "shown" if not report_md.startswith("No eval report") else "none yet"})


if __name__ == "__main__":
    raise SystemExit(run_job("serve", __doc__, ServeConfig, main))
