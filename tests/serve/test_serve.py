"""`make serve`: the page to try a run, in a real headless browser (Debian's chromium, driven by
Playwright), and its parts (which run and base, the report and curves, one click) without one.

The browser test builds a run as train writes it (tiny random Whisper, a LoRA adapter whose B
weights are not zero, so that the fine-tune writes other text than the base), evaluates it,
starts `python -m jobs.serve` as its own process, uploads a clip, and reads both transcripts off
the page: they must be what the transcribe job prints for the same file with the adapter and
without it. Every socket the server opens and every request the browser makes is recorded:
nothing may reach past this machine.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from lib.env import Env
from lib.errors import UserError
from tests.helpers import make_run, tone

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = shutil.which("chromium")
# The flags this kind of machine needs (no sandbox as root, no GPU, and no background calls to
# Google's services, which a closed network refuses many times a second).
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--no-proxy-server",
                  # a microphone for the recording test: Chromium's built-in fake device (a beep),
                  # granted without the permission prompt
                  "--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream"]
TOKENS = 16  # max_new_tokens on the page and in the expected transcripts: a random model never stops early
LOOPBACK = ("127.", "::1", "localhost")


def chromium_or_skip() -> str:
    """Debian's chromium; `make setup` installs it where it can (root with apt-get). Only where it
    cannot may the browser test skip; where it could, a missing browser is a failure."""
    if CHROMIUM:
        return CHROMIUM
    if os.geteuid() == 0 and shutil.which("apt-get"):
        pytest.fail("Debian's chromium is missing, and this machine can install it: run `make setup` "
                    "(it runs apt-get install chromium)")
    pytest.skip("the browser test needs Debian's chromium, and installing it needs root and apt-get: "
                "sudo apt-get install chromium")


# ---- which run, which base ------------------------------------------------------------------


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, tiny_model_dir):
    d = tmp_path_factory.mktemp("serve-data")
    make_run(d, tiny_model_dir)  # runs/tiny-run: adapter/, config.yaml (model.base), log_history.json
    return d


def test_the_base_defaults_to_the_runs_config_yaml_and_base_wins(data_dir, tiny_model_dir, tmp_path):
    from lib.serve.page import resolve_run

    source, note = resolve_run(Env(data_dir=data_dir), "tiny-run")
    assert source.base == str(tiny_model_dir) and source.adapter.endswith("runs/tiny-run/adapter") and note is None
    other = shutil.copytree(tiny_model_dir, tmp_path / "same-shapes")
    source, _ = resolve_run(Env(data_dir=data_dir), "tiny-run", base=str(other))
    assert source.base == str(other)


def test_a_missing_run_or_base_is_an_error_naming_the_flag(data_dir, tmp_path):
    from jobs.serve import ServeConfig
    from lib.serve.page import resolve_run

    with pytest.raises(UserError, match=r"run=nope: .* does not exist \(runs: tiny-run\)"):
        resolve_run(Env(data_dir=data_dir), "nope")
    gone = tmp_path / "data"
    run = shutil.copytree(data_dir / "runs" / "tiny-run", gone / "runs" / "moved")
    (run / "config.yaml").write_text("model:\n  base: /nowhere/whisper-small\n")
    with pytest.raises(UserError, match=r"model.base=/nowhere/whisper-small, which is not here: set base="):
        resolve_run(Env(data_dir=gone), "moved")
    with pytest.raises(UserError, match="set run=NAME"):
        ServeConfig()
    with pytest.raises(UserError, match="port=0"):
        ServeConfig(run="x", port=0)


def test_a_run_without_an_adapter_serves_its_base_and_says_why(data_dir, tiny_model_dir, tmp_path):
    from lib.serve.page import resolve_run

    run = tmp_path / "data" / "runs" / "training"
    run.mkdir(parents=True)
    shutil.copy(data_dir / "runs" / "tiny-run" / "config.yaml", run / "config.yaml")
    source, note = resolve_run(Env(data_dir=tmp_path / "data"), "training")
    assert source.base == str(tiny_model_dir) and source.adapter is None
    assert "has no adapter yet" in note and "make train" in note
    (run / "config.yaml").unlink()
    with pytest.raises(UserError, match="no adapter yet and no config.yaml naming its base: set base="):
        resolve_run(Env(data_dir=tmp_path / "data"), "training")


def test_the_page_of_a_run_without_an_adapter_transcribes_with_the_base_and_says_why(
        data_dir, tmp_path, monkeypatch):
    """jobs.serve end to end but for the server: the page it builds for a run still training."""
    from jobs.serve import ServeConfig, main

    run = tmp_path / "data" / "runs" / "training"
    run.mkdir(parents=True)
    shutil.copy(data_dir / "runs" / "tiny-run" / "config.yaml", run / "config.yaml")
    pages = []
    monkeypatch.setattr("lib.serve.page.launch", lambda page, host, port: pages.append(page))
    main(ServeConfig(run="training", max_new_tokens=TOKENS), Env(data_dir=tmp_path / "data"))
    page = pages[0]
    parts = {b.elem_id: b for b in page.blocks.values() if getattr(b, "elem_id", None)}
    assert "has no adapter yet" in parts["message"].value and "(no adapter yet)" in parts["tuned-text"].label
    assert "No eval report" in parts["report"].value
    wav = tmp_path / "clip.wav"
    sf.write(wav, tone(1.0, 300), 16_000)
    on_click = next(iter(page.fns.values())).fn
    base, base_time, tuned, tuned_time, message = on_click(str(wav))
    assert base and base_time.startswith("decoded in ") and tuned == "" and tuned_time == "no adapter yet"
    assert message.startswith("clip.wav: 1.0 s of audio") and "has no adapter yet" in message


# ---- what the page shows under the transcripts ----------------------------------------------


def test_report_section_is_reports_table_or_how_to_make_one(tmp_path):
    from lib.evaluate.report import METRIC_LABELS, render_markdown
    from lib.serve.page import report_section

    run = tmp_path / "runs" / "r"
    text = report_section("r", run)
    assert "No eval report" in text and "make eval RUN=r" in text
    m = {"normalized_wer": 0.25, "normalized_cer": 0.1, "wer": 0.3, "cer": 0.12, "basic_normalized_wer": 0.2,
         "empty": 0, "repetition": 1, "too_long": 0, "truncated": 0}
    report = {"model": "b", "adapter": "a", "data": "d", "split": "test", "language": "hi", "task": "transcribe",
              "counts": {"utterances": 3, "audio_hours": 0.001}, "device": "cpu", "precision": "float32",
              "quantization": "none", "speed": {"clips_per_s": 2.0}, "batch_size": 2, "max_new_tokens": 8,
              "results": {"adapter": m, "base": {**m, "wer": 0.9}}, "worst": [], "versions": {}}
    (run / "eval").mkdir(parents=True)
    (run / "eval" / "report.json").write_text(json.dumps(report))
    text = report_section("r", run)
    assert "| metric | adapter | base |" in text and "| WER, exact text | 30.00 % | 90.00 % |" in text
    assert all(label in text for label in METRIC_LABELS.values())
    # the same lines as report.md's head: one renderer for both
    assert text.split("\n\nThe whole report")[0] in render_markdown(report)
    (run / "eval" / "report.json").write_text("{not json")
    assert "cannot be read" in report_section("r", run)


def test_training_curves_from_eval_else_drawn_from_log_history(data_dir, tmp_path):
    from lib.serve.page import training_curves

    run = data_dir / "runs" / "tiny-run"
    png, caption = training_curves(run, tmp_path)
    assert png == tmp_path / "training_curves.png" and png.stat().st_size > 1000 and "log_history.json" in caption
    copy = shutil.copytree(run, tmp_path / "copy")
    (copy / "eval").mkdir(exist_ok=True)
    shutil.copy(png, copy / "eval" / "training_curves.png")
    assert training_curves(copy, tmp_path)[0] == copy / "eval" / "training_curves.png"
    empty = tmp_path / "empty"
    empty.mkdir()
    png, caption = training_curves(empty, tmp_path)
    assert png is None and "log_history.json is missing" in caption


# ---- one click, without the browser ---------------------------------------------------------


def test_one_click_gives_both_transcripts_and_a_bad_clip_gives_a_message(data_dir, tmp_path):
    from lib.model import load_model
    from lib.serve.page import Served, resolve_run, transcribe_both

    source, _ = resolve_run(Env(data_dir=data_dir), "tiny-run")
    model, processor, _ = load_model(source)
    served = Served(model, processor, "hi", "transcribe", TOKENS, source.base, "tiny-run", has_adapter=True)
    wav = tmp_path / "clip.wav"
    sf.write(wav, tone(1.0, 300), 16_000)
    t = transcribe_both(served, str(wav))
    assert t.base and t.tuned and t.base != t.tuned and t.base_seconds > 0 and t.tuned_seconds > 0
    assert t.message.startswith("clip.wav: 1.0 s of audio")
    # the adapter is on again after the base's turn
    assert transcribe_both(served, str(wav)).tuned == t.tuned
    junk = tmp_path / "junk.wav"
    junk.write_bytes(b"RIFF not really" * 50)
    t = transcribe_both(served, str(junk))
    assert t.message.startswith("error: junk.wav: cannot decode it") and str(tmp_path) not in t.message
    assert not t.base and not t.tuned
    assert transcribe_both(served, None).message == "Upload a clip or record one first."


# ---- the page in a real browser -------------------------------------------------------------

# Runs jobs.serve with an audit hook that writes down every address the process connects to or
# looks up (Python's own socket events: httpx, urllib, asyncio all go through them).
NET_LOGGED_SERVE = """
import os, runpy, sys
log = open(os.environ["NET_LOG"], "a", buffering=1)
def hook(event, args):
    if event == "socket.connect" and isinstance(args[1], tuple):
        log.write(f"connect {args[1][0]}\\n")
    elif event == "socket.getaddrinfo":
        host = args[0].decode() if isinstance(args[0], bytes) else args[0]
        log.write(f"resolve {host}\\n")
sys.addaudithook(hook)
sys.argv = ["jobs.serve", *sys.argv[1:]]
runpy.run_module("jobs.serve", run_name="__main__", alter_sys=True)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_page(url: str, proc: subprocess.Popen, log: Path, seconds: float = 120) -> None:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never through a proxy
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if proc.poll() is not None:
            pytest.fail(f"jobs.serve exited {proc.returncode}:\n{log.read_text()[-4000:]}")
        try:
            with opener.open(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"no page at {url} after {seconds:.0f} s:\n{log.read_text()[-4000:]}")


@pytest.fixture(scope="module")
def page_server(data_dir, tiny_model_dir, tmp_path_factory):
    """jobs.serve on a free port for runs/tiny-run (evaluated first, so the page has a report),
    Debian's chromium through Playwright, and what each side reached."""
    chromium = chromium_or_skip()
    from playwright.sync_api import sync_playwright

    from jobs.eval import EvalConfig
    from jobs.eval import main as eval_main
    from lib.evaluate.longform import LongformConfig

    eval_main(EvalConfig(run="tiny-run", batch_size=3, max_new_tokens=4, no_speech_clips=0,
                         longform=LongformConfig(recordings=0), track=False), Env(data_dir=data_dir))
    work = tmp_path_factory.mktemp("serve-page")
    (work / "empty.env").write_text("")
    port = free_port()
    log, net = work / "serve.log", work / "net.log"
    tmp = work / "tmp"  # the job's temporary files (and Gradio's copies of uploads) go here
    tmp.mkdir()
    env = {**os.environ, "DATA_DIR": str(data_dir), "HF_HUB_OFFLINE": "1", "NET_LOG": str(net), "TMPDIR": str(tmp),
           "PYTHONPATH": str(ROOT), "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}
    env.pop("GRADIO_ANALYTICS_ENABLED", None)  # the job turns it off itself
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-c", NET_LOGGED_SERVE, "--env-file", str(work / "empty.env"),
                                 "run=tiny-run", f"port={port}", f"max_new_tokens={TOKENS}"],
                                cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    requests: list[str] = []
    try:
        wait_for_page(url, proc, log)
        with sync_playwright() as pw:
            browser = pw.chromium.launch_persistent_context(
                tempfile.mkdtemp(dir=work), executable_path=chromium, args=CHROMIUM_FLAGS, headless=True,
                permissions=["microphone"])
            browser.on("request", lambda r: requests.append(r.url))
            try:
                yield {"url": url, "browser": browser, "work": work, "log": log, "net": net, "requests": requests,
                       "proc": proc, "env": Env(data_dir=data_dir), "base": str(tiny_model_dir)}
            finally:
                browser.close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def expected(server, audio: Path, capsys) -> tuple[str, str]:
    """(base, fine-tune): what the transcribe job prints for this file without the adapter and with it."""
    from jobs.transcribe import TranscribeConfig
    from jobs.transcribe import main as transcribe

    tuned = transcribe(TranscribeConfig(audio=str(audio), run="tiny-run", max_new_tokens=TOKENS), server["env"])
    base = transcribe(TranscribeConfig(audio=str(audio), model=server["base"], language="hi",
                                       max_new_tokens=TOKENS), server["env"])
    capsys.readouterr()
    assert base and tuned and base != tuned  # else a page showing one model twice would pass
    return base, tuned


def transcribe_on_page(page) -> tuple[str, str, str]:
    """Press Transcribe; (message, base transcript, fine-tune transcript) once the click is answered."""
    from playwright.sync_api import expect

    page.click("#transcribe")
    expect(page.locator("#message")).to_contain_text(" s of audio", timeout=60_000)
    return (page.locator("#message").inner_text(), page.locator("#base-text textarea").input_value(),
            page.locator("#tuned-text textarea").input_value())


def open_page(server):
    page = server["browser"].new_page()
    page.goto(server["url"])
    page.wait_for_selector("#transcribe")
    return page


def upload(page, path: Path, accepted: bool = True) -> None:
    """Set the clip as a user's file dialog would; wait until Gradio holds it (its download link)."""
    page.locator("#clip input[type=file]").set_input_files(str(path))
    if accepted:
        page.wait_for_selector(f'#clip a[download][href$="{path.name}"]', timeout=30_000)


def test_the_page_shows_the_base_and_the_fine_tune_as_transcribe_writes_them(page_server, capsys):
    # A 44.1 kHz stereo file: the page decodes and resamples it as transcribe does.
    wav = page_server["work"] / "clip.wav"
    sf.write(wav, np.stack([tone(1.5, 300, sr=44_100), tone(1.5, 310, sr=44_100)], axis=1), 44_100)
    base, tuned = expected(page_server, wav, capsys)

    page = open_page(page_server)
    upload(page, wav)
    message, base_on_page, tuned_on_page = transcribe_on_page(page)
    assert message.startswith("clip.wav: 1.5 s of audio")
    assert (base_on_page, tuned_on_page) == (base, tuned)
    for side in ("#base-time", "#tuned-time"):
        assert page.locator(side).inner_text().startswith("decoded in ")
    # below: the eval report's table (eval ran first) and its training curves
    report = page.locator("#report").inner_text()
    assert "WER, normalized" in report and "adapter" in report and "base" in report
    assert page.locator("#curves img").count() == 1
    page.screenshot(path=str(page_server["work"] / "page.png"), full_page=True)
    page.close()


def test_a_recorded_clip_is_transcribed_too(page_server, capsys):
    """The microphone: Chromium's fake device records a beep; the page transcribes the recording,
    and the file the server received gives the same texts through the transcribe job."""
    page = open_page(page_server)
    clip = page.locator("#clip")
    clip.get_by_role("button", name="Record audio").click()
    clip.get_by_role("button", name="Record", exact=True).click()
    page.wait_for_timeout(2000)
    clip.get_by_role("button", name="Stop", exact=True).click()
    link = page.wait_for_selector("#clip a[download]", timeout=30_000).get_attribute("href")
    message, base_on_page, tuned_on_page = transcribe_on_page(page)
    page.close()
    recorded = page_server["work"] / "recorded.wav"
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(link, timeout=10) as r:
        recorded.write_bytes(r.read())
    seconds = sf.info(recorded).duration
    assert 1.0 < seconds < 10 and message.startswith(f"{link.rsplit('/', 1)[1]}: ")  # audio.wav: 2.1 s of audio
    assert (base_on_page, tuned_on_page) == expected(page_server, recorded, capsys)


def test_a_bad_upload_shows_a_message_not_a_stack_trace(page_server):
    from playwright.sync_api import expect

    work = page_server["work"]
    page = open_page(page_server)
    # Not audio by its name: Gradio's upload box refuses it in the browser, and says so.
    (work / "notes.txt").write_text("not audio\n" * 20)
    upload(page, work / "notes.txt", accepted=False)
    expect(page.get_by_text("Invalid file type")).to_be_visible(timeout=10_000)
    page.click("#transcribe")
    expect(page.locator("#message")).to_have_text("Upload a clip or record one first.", timeout=30_000)
    # Audio by its name, not by its bytes: our decoder refuses it and the page says why.
    (work / "broken.wav").write_bytes(b"RIFF" + bytes(range(256)) * 8)
    upload(page, work / "broken.wav")
    page.click("#transcribe")
    expect(page.locator("#message")).to_contain_text("error: broken.wav: cannot decode it", timeout=60_000)
    text = page.locator("body").inner_text()
    assert "Traceback" not in text and str(work) not in text
    assert page.locator("#base-text textarea").input_value() == ""
    page.close()
    assert "Traceback" not in page_server["log"].read_text()


def test_nothing_leaves_the_machine(page_server):
    """Last in this file: by now the page was loaded, clips uploaded and transcribed."""
    page = open_page(page_server)
    page.close()
    assert page_server["requests"], "the browser recorded no request"
    away = [u for u in page_server["requests"] if not u.startswith((page_server["url"], "blob:", "data:"))]
    assert not away, f"the browser fetched from elsewhere: {away[:5]}"
    lines = page_server["net"].read_text().splitlines()
    assert any(line.startswith("connect 127.0.0.1") for line in lines), "the audit hook saw nothing"
    away = [line for line in lines if not line.split(" ", 1)[1].startswith(LOOPBACK) and line != "resolve None"]
    assert not away, f"the server reached past this machine: {sorted(set(away))}"


def test_sigterm_stops_the_page_and_the_job_says_so(page_server):
    """Last: `docker stop` (SIGTERM) closes the server as Ctrl-C does; the job ends with its summary."""
    proc = page_server["proc"]
    proc.terminate()
    assert proc.wait(timeout=60) == 0
    log = page_server["log"].read_text()
    assert "== serve done in " in log and "Traceback" not in log
    # the clips uploaded by the tests above, and the page's own files, are gone with it
    assert not any((page_server["work"] / "tmp").rglob("*")), sorted((page_server["work"] / "tmp").rglob("*"))
