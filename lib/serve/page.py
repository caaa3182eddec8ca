"""The page `make serve` starts (jobs/serve.py): a clip through a run's base and its fine-tune.

    audio (upload or microphone) -> Transcribe -> | base transcript | fine-tune transcript |
                                                  | decode time     | decode time          |
    the run's eval report table (eval/report.json) and training curves (log_history.json)

One model in memory: the base with the run's LoRA adapter attached (lib.model.load_model). The
base's transcript comes from the same weights inside `model.disable_adapter()`, so a
whisper-large-v2 run costs one copy of the base (3 GB in fp16), not two. Decoding is transcribe's:
lib.audio.load_file, then lib.inference.transcribe_long with the language and task forced, so the
page shows what `make transcribe` prints for the same clip, with the adapter and without it.

Offline and private: Gradio's analytics and its version check are off (GRADIO_ANALYTICS_ENABLED=False
and analytics_enabled=False), no share link, no run history (it offers a Hub bucket), no MCP server,
no server-side rendering (Node), and the default theme's fonts are Gradio's own files.
tests/serve/test_serve.py checks that neither the server nor the browser reaches any other address.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lib.errors import UserError
from lib.whisper import SAMPLING_RATE

log = logging.getLogger("whisper_ft")

# Gradio reads this when it decides whether to send usage data and to ask for its newest version;
# Blocks(analytics_enabled=False) covers the page, the variable covers the rest of the package.
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"

# Uploads the server accepts: an hour of 16-bit 16 kHz mono WAV is 115 MB; a 44.1 kHz stereo
# recording of 10 minutes is 106 MB. A page for trying a model needs no more.
MAX_UPLOAD = "200mb"


@dataclass
class Served:
    """What the page transcribes with: the loaded model and the settings transcribe would use."""

    model: Any
    """the base with the adapter attached (a PeftModel), or the plain base when the run has none yet"""
    processor: Any
    language: str
    task: str
    max_new_tokens: int
    base: str
    """the base's name as loaded (folder or Hub id)"""
    run: str
    has_adapter: bool
    note: str | None = None
    """why the fine-tune column is empty (the run has no adapter yet), shown on the page"""
    gate: Any = None
    """lib.inference.NoSpeechGate, as transcribe's (None: off)"""


@dataclass
class Transcripts:
    """One Transcribe click: each model's text and decode time; message: what went wrong, or the clip."""

    base: str = ""
    base_seconds: float | None = None
    tuned: str = ""
    tuned_seconds: float | None = None
    message: str = ""
    audio_seconds: float = 0.0


# --- Which run, which base -------------------------------------------------------------------


def run_base(run_config: dict[str, Any]) -> str | None:
    """The base model a run was trained on, as its config.yaml records it (model.base)."""
    model = run_config.get("model") or {}
    return str(model["base"]) if isinstance(model, dict) and model.get("base") else None


def resolve_run(env, run: str, base: str | None = None):
    """(ModelSource, note) for run=RUN: its adapter on `base` (default: config.yaml's model.base,
    else the adapter's own base). A run that exists but has no adapter yet (still training, or
    stopped before its first save) serves its base alone; `note` says why, for the page."""
    import yaml

    from lib.model import ModelSource, _is_local, resolve_source

    run_dir = env.run_dir(run)
    config = run_dir / "config.yaml"
    run_config = (yaml.safe_load(config.read_text()) or {}) if config.is_file() else {}
    chosen = base or run_base(run_config)
    if chosen and not base and _is_local(chosen) and not Path(chosen).expanduser().is_dir():
        raise UserError(f"run={run}: its config.yaml says model.base={chosen}, which is not here: set base= to "
                        f"that model's folder or Hub id")
    if run_dir.is_dir() and not (run_dir / "adapter" / "adapter_config.json").is_file():
        if not chosen:
            raise UserError(f"run={run} has no adapter yet and no config.yaml naming its base: set base=")
        note = (f"run {run} has no adapter yet ({run_dir}/adapter/adapter_config.json is missing: the run has "
                f"not saved one; wait for `make train`): only the base transcribes")
        log.warning("serve: %s", note)
        return ModelSource(base=chosen, run_dir=run_dir, run_config=run_config), note
    return resolve_source(env, run=run, model=chosen), None


# --- One click ---------------------------------------------------------------------------------


def user_message(error: UserError, path: str) -> str:
    """A decoding error as the page shows it: the uploaded file's name, not Gradio's temp path."""
    text = str(error).replace(str(Path(path).parent) + os.sep, "")
    return text.removeprefix("audio=")


def transcribe_both(served: Served, path: str | None) -> Transcripts:
    """Decode the clip as transcribe does, then transcribe it with the base and the fine-tune.
    A clip that cannot be used comes back as a message, never as an exception."""
    from lib.audio import load_file
    from lib.inference import transcribe_long

    if not path:
        return Transcripts(message="Upload a clip or record one first.")
    try:
        audio = load_file(path)
    except UserError as e:
        log.info("serve: refused %s: %s", Path(path).name, user_message(e, path))
        return Transcripts(message=f"error: {user_message(e, path)}")
    out = Transcripts(audio_seconds=len(audio) / SAMPLING_RATE)
    gen = (served.language, served.task, served.max_new_tokens)
    if served.has_adapter:
        t0 = time.perf_counter()
        with served.model.disable_adapter():
            out.base = transcribe_long(served.model, served.processor, audio, *gen, gate=served.gate)
        out.base_seconds = time.perf_counter() - t0
        t0 = time.perf_counter()
        out.tuned = transcribe_long(served.model, served.processor, audio, *gen, gate=served.gate)
        out.tuned_seconds = time.perf_counter() - t0
    else:
        t0 = time.perf_counter()
        out.base = transcribe_long(served.model, served.processor, audio, *gen, gate=served.gate)
        out.base_seconds = time.perf_counter() - t0
    name = Path(path).name
    out.message = f"{name}: {out.audio_seconds:.1f} s of audio, language `{served.language}`, task `{served.task}`"
    log.info("serve: %s (%.1f s): base %.2f s, fine-tune %s", name, out.audio_seconds, out.base_seconds,
             f"{out.tuned_seconds:.2f} s" if out.tuned_seconds is not None else "none (no adapter)")
    return out


def timing(seconds: float | None, audio_seconds: float) -> str:
    """'decoded in 0.42 s (2.4x real time)' under a transcript."""
    if seconds is None:
        return ""
    speed = f" ({audio_seconds / seconds:.1f}x real time)" if seconds > 0 and audio_seconds else ""
    return f"decoded in {seconds:.2f} s{speed}"


# --- What the page shows under the transcripts -------------------------------------------------


def report_section(run: str, run_dir: Path | None) -> str:
    """The eval report's head (lib.evaluate.report.render_summary: what was evaluated, the before/after
    table, the flags) from RUN/eval/report.json, or how to make one."""
    import json

    from lib.evaluate.report import render_summary

    report_json = run_dir / "eval" / "report.json" if run_dir is not None else None
    if report_json is None or not report_json.is_file():
        return (f"No eval report for run `{run}` yet: `make eval RUN={run}` (or `python -m jobs.eval run={run}`) "
                f"writes `runs/{run}/eval/report.md`; restart this page to see its table here.")
    try:
        report = json.loads(report_json.read_text())
        lines = render_summary(report)
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"The eval report {report_json} cannot be read ({type(e).__name__}: {e}): run `make eval RUN={run}` again."
    return "\n".join([*lines, "", f"The whole report (long-form, worst clips, hallucination): "
                                  f"`runs/{run}/eval/report.md`."])


def training_curves(run_dir: Path | None, workdir: Path) -> tuple[Path | None, str]:
    """(PNG, caption): eval's RUN/eval/training_curves.png, else a plot of RUN/log_history.json
    drawn into workdir, else (None, why there is none)."""
    from lib.evaluate.report import plot_training_curves

    if run_dir is None:
        return None, "No training curves: this is not a run folder."
    drawn = run_dir / "eval" / "training_curves.png"
    if drawn.is_file():
        return drawn, f"runs/{run_dir.name}/eval/training_curves.png (drawn by make eval)"
    history = run_dir / "log_history.json"
    if history.is_file() and plot_training_curves(history, workdir / "training_curves.png"):
        return workdir / "training_curves.png", f"from runs/{run_dir.name}/log_history.json"
    return None, (f"No training curves: runs/{run_dir.name}/log_history.json is missing or has no loss yet "
                  f"(train writes it at every log step).")


# --- The page ----------------------------------------------------------------------------------


def build_page(served: Served, report_md: str, curves: Path | None, curves_caption: str):
    """The Gradio Blocks (not started: launch() starts it)."""
    import gradio as gr

    tuned_label = f"fine-tune: {served.run}" + ("" if served.has_adapter else " (no adapter yet)")
    with gr.Blocks(title=f"whisper-finetune: {served.run}", analytics_enabled=False) as page:
        gr.Markdown(f"## Try run `{served.run}`: the base and the fine-tune on the same clip\n"
                    f"Base `{served.base}`" + (" + the run's LoRA adapter" if served.has_adapter else "")
                    + f"; language `{served.language}`, task `{served.task}`, greedy, as `make transcribe`.")
        audio = gr.Audio(sources=["upload", "microphone"], type="filepath", format=None,
                         label="clip (wav, flac, ogg, mp3; longer than 30 s: cut into 30-s windows)",
                         buttons=["download"], elem_id="clip")
        button = gr.Button("Transcribe", variant="primary", elem_id="transcribe")
        message = gr.Markdown(served.note and f"note: {served.note}" or "", elem_id="message")
        with gr.Row(equal_height=True):
            with gr.Column():
                base_text = gr.Textbox(label=f"base: {Path(served.base).name}", lines=4, interactive=False,
                                       buttons=["copy"], elem_id="base-text")
                base_time = gr.Markdown(elem_id="base-time")
            with gr.Column():
                tuned_text = gr.Textbox(label=tuned_label, lines=4, interactive=False, buttons=["copy"],
                                        elem_id="tuned-text")
                tuned_time = gr.Markdown(served.note and "no adapter yet" or "", elem_id="tuned-time")
        gr.Markdown("### Eval report")
        gr.Markdown(report_md, elem_id="report")
        gr.Markdown("### Training curves")
        if curves is not None:
            gr.Image(value=str(curves), format="png", label=curves_caption, interactive=False, height=380,
                     buttons=["download", "fullscreen"], elem_id="curves")
        else:
            gr.Markdown(curves_caption, elem_id="curves")

        def on_click(path):
            t = transcribe_both(served, path)
            return (t.base, timing(t.base_seconds, t.audio_seconds), t.tuned,
                    timing(t.tuned_seconds, t.audio_seconds) or (served.note and "no adapter yet") or "",
                    t.message if not served.note or t.message.startswith("error") else f"{t.message}\n\nnote: {served.note}")

        # One click at a time: disable_adapter() switches the adapter off on the one shared model,
        # so a second click decoding meanwhile would get the base's weights for its fine-tune.
        button.click(on_click, inputs=audio, outputs=[base_text, base_time, tuned_text, tuned_time, message],
                     concurrency_limit=1)
    return page


def no_proxy_for_loopback() -> None:
    """Keep this machine's own addresses off any HTTP(S) proxy. Why: at start-up Gradio calls its
    own server over HTTP (httpx, which honours HTTPS_PROXY/HTTP_PROXY); behind a proxy that call
    goes to the proxy and launch() fails ("Couldn't start the app because
    '.../gradio_api/startup-events' failed (code 502)", gradio-app/gradio#10729 and many reports).
    The proxy still serves everything else (a base model from the Hub)."""
    for key in ("NO_PROXY", "no_proxy"):
        have = [h.strip() for h in os.environ.get(key, "").split(",") if h.strip()]
        os.environ[key] = ",".join(dict.fromkeys([*have, "127.0.0.1", "localhost", "::1"]))


def _stop(signum, frame):
    raise KeyboardInterrupt  # Gradio's launch() closes the server on it and returns


def launch(page, host: str, port: int) -> None:
    """Serve the page until Ctrl-C (or SIGTERM); nothing leaves this machine (module docstring)."""
    no_proxy_for_loopback()
    # SIGTERM (docker stop, a Kubernetes eviction, tests) closes the server as Ctrl-C does, and the
    # job prints its summary; so does SIGINT even where the shell that started us ignores it (a
    # background job of a non-interactive shell inherits SIGINT ignored, and Python then has no
    # KeyboardInterrupt to raise).
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    # httpx logs each of Gradio's start-up calls to its own server at INFO: noise, not news.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        page.launch(server_name=host, server_port=port, share=False, quiet=True, show_error=False,
                    footer_links=[], run_history=False, mcp_server=False, ssr_mode=False, pwa=False,
                    enable_monitoring=False, max_file_size=MAX_UPLOAD, inbrowser=False)
    except OSError as e:  # Gradio: "Cannot find empty port in range: 7860-7860 ..."
        raise UserError(f"port={port} on {host}: cannot listen there ({str(e).splitlines()[0]}); set port= to a "
                        f"free port (make serve PORT=7861)") from None
