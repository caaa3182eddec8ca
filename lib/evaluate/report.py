"""Evaluation reports: report.json (machine), report.md (people), predictions.tsv, training curves.

    OUT/
      report.json       metrics per model (adapter and base), counts, flags, what was evaluated
      report.md         the same as tables, plus the worst utterances
      predictions.tsv   id, duration, reference, hypothesis, word errors, flags (and the base's)
      training_curves.png   loss, eval loss and eval WER vs step (only for a run folder)
"""

from __future__ import annotations

import csv
import json
import logging
import platform
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lib.evaluate.forgetting import render as forgetting_lines
from lib.evaluate.longform import render as longform_lines
from lib.metrics import BASIC_LABEL, Utterance

log = logging.getLogger("whisper_ft")

WORST_N = 20
PACKAGES = ("torch", "transformers", "peft", "accelerate", "bitsandbytes", "datasets", "jiwer", "ctranslate2")

# log_history.json's eval_wer comes from lib.train.trainer.word_error_rate, which reports percent
# (the walkthrough's unit), while report.json's rates are fractions. The unit is known, so it
# is not guessed from the values: "<= 1.5 means a fraction" drew a run at 1 % WER as 100 %.
# tests/prepare/test_prepare_trust.py ties this factor to the trainer's real compute_metrics.
LOG_HISTORY_WER_TO_PERCENT = 1.0

METRIC_LABELS = {
    "normalized_wer": "WER, normalized (NFKC, casefold, punctuation removed, vowel signs kept)",
    "normalized_cer": "CER, normalized",
    "wer": "WER, exact text",
    "cer": "CER, exact text",
    "basic_normalized_wer": BASIC_LABEL,
}


def package_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def device_description() -> str:
    import torch

    if torch.cuda.is_available():
        return f"cuda: {torch.cuda.get_device_name(0)}"
    return f"cpu: {platform.processor() or platform.machine()}"


def worst(utts: Sequence[Utterance], n: int = WORST_N) -> list[Utterance]:
    """Most word errors first; ties broken by the higher per-utterance rate, then the id."""
    return sorted(utts, key=lambda u: (-u.word_errors, -u.word_errors / max(u.ref_words, 1), u.id))[:n]


def write_predictions(path: Path, utts: Sequence[Utterance], durations: Sequence[float],
                      base: Sequence[Utterance] | None = None) -> None:
    """One row per clip, tab-separated; tabs and newlines inside text become spaces."""

    def clean(s: str) -> str:
        return " ".join(s.split())

    header = ["id", "duration", "reference", "hypothesis", "word_errors", "ref_words", "flags"]
    if base is not None:
        header += ["base_hypothesis", "base_word_errors", "base_flags"]
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, delimiter="\t", quoting=csv.QUOTE_MINIMAL, lineterminator="\n")
        w.writerow(header)
        for i, u in enumerate(utts):
            row = [u.id, f"{durations[i]:.2f}", clean(u.reference), clean(u.hypothesis), u.word_errors,
                   u.ref_words, ",".join(u.flags)]
            if base is not None:
                b = base[i]
                row += [clean(b.hypothesis), b.word_errors, ",".join(b.flags)]
            w.writerow(row)


RANDOM_WEIGHTS_NOTE = ("The base model has random weights (built by lib/tools/models.py, as `make demo` and "
                       "`make bench` do): every transcript is noise, so the WERs below mean nothing; they show "
                       "that the pipeline runs, not how well a model transcribes.")


def _pct(x: float) -> str:
    return f"{100 * x:.2f} %"


def render_markdown(report: dict[str, Any]) -> str:
    """report.md: what was evaluated, the metrics table (before/after), flags, worst clips."""
    names = list(report["results"])
    lines = [f"# Evaluation: {report['model']}" + (f" + {report['adapter']}" if report.get("adapter") else ""), ""]
    lines += render_summary(report)
    lines += longform_lines(report) + forgetting_lines(report)
    lines += ["", f"## Worst {len(report['worst'])} clips ({names[0]}, by normalized word errors)", "",
              "| id | errors / words | reference | hypothesis | flags |", "|---|---|---|---|---|"]
    for u in report["worst"]:
        ref, hyp = (s.replace("|", "\\|") for s in (u["reference"], u["hypothesis"]))
        lines.append(f"| {u['id']} | {u['word_errors']} / {u['ref_words']} | {ref} | {hyp} | {','.join(u['flags'])} |")
    lines += render_hallucination(report.get("hallucination"))
    if report.get("training_curves"):
        lines += ["", f"![training curves]({report['training_curves']})"]
    lines += ["", "Packages: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items()), ""]
    return "\n".join(lines)


def render_summary(report: dict[str, Any]) -> list[str]:
    """The head of report.md: what was evaluated, and the metrics and flags per model (before/after).
    `make serve` shows these same lines under its transcripts."""
    models = report["results"]
    names = list(models)
    lines = [f"> **{RANDOM_WEIGHTS_NOTE}**", ""] if report.get("random_weights") else []
    lines += [
        f"- data: `{report['data']}` split `{report['split']}`, {report['counts']['utterances']} clips, "
        f"{report['counts']['audio_hours']:.3f} h",
        f"- language `{report['language']}`, task `{report['task']}`",
        f"- device {report['device']}, precision {report['precision']}, quantization {report['quantization']}",
        f"- generation: {report['speed']['clips_per_s']:.2f} clips/s (batch {report['batch_size']})",
        "",
        "| metric | " + " | ".join(names) + " |",
        "|---|" + "---|" * len(names),
    ]
    for key, label in METRIC_LABELS.items():
        lines.append(f"| {label} | " + " | ".join(_pct(models[n][key]) for n in names) + " |")
    for key, label in (("empty", "empty outputs"), ("repetition", "repetition loops (n-gram x4+)"),
                       ("too_long", "hypothesis > 2x reference"),
                       ("truncated", f"cut at max_new_tokens={report.get('max_new_tokens', '?')}"),
                       ("judged_no_speech", "emptied by the no-speech gate")):
        lines.append(f"| {label} | " + " | ".join(str(models[n].get(key, 0)) for n in names) + " |")
    return lines


def render_hallucination(section: dict[str, Any] | None) -> list[str]:
    """report.md's hallucination section: the share of clips without speech that get text, per
    model and per kind of clip, and a few of the texts; nothing when eval ran without it."""
    if not section:
        return []
    names = list(section["results"])
    kinds = ", ".join(f"{n} {k}" for k, n in section["kinds"].items())
    lines = ["", "## Hallucination on audio without speech", "",
             f"{section['clips']} clips ({kinds}); a clip counts when the normalized transcript is not empty.", "",
             "| clips that produce text | " + " | ".join(names) + " |", "|---|" + "---|" * len(names),
             "| all | " + " | ".join(f"{_pct(section['results'][n]['rate'])} ({section['results'][n]['with_text']})"
                                    for n in names) + " |"]
    for kind in section["kinds"]:
        lines.append(f"| {kind} | " + " | ".join(_pct(section["results"][n]["by_kind"][kind]) for n in names) + " |")
    if section.get("ungated"):
        g = section["gate"]
        lines.append("| all, before the no-speech gate | " + " | ".join(
            f"{_pct(section['ungated'][n]['rate'])} ({section['ungated'][n]['with_text']})" for n in names) + " |")
        lines.append("| mean no-speech probability | " + " | ".join(
            f"{section['no_speech_prob'][n]:.2f}" for n in names) + " |")
        lines += ["", f"The no-speech gate (no_speech_threshold={g['no_speech_threshold']:g}, logprob_threshold="
                      f"{g['logprob_threshold']:g}) empties a clip whose no-speech probability is above the first "
                      f"and whose transcript's mean log-probability is below the second (0: the probability alone "
                      f"decides), as transcribe does; the row before it is the model's own transcripts."]
    for name in names:
        if section["examples"].get(name):
            lines += ["", f"{name} writes, for example:", ""]
            lines += ["- " + e.replace("|", "\\|") for e in section["examples"][name]]
    return lines


def write_report(out: Path, report: dict[str, Any]) -> None:
    (out / "report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False, default=str))
    (out / "report.md").write_text(render_markdown(report), encoding="utf-8")


def plot_training_curves(log_history: Path, out_png: Path) -> bool:
    """loss and eval loss (left axis) and eval WER (right axis) vs step; False when nothing to plot."""
    try:
        history = json.loads(log_history.read_text())
    except (OSError, json.JSONDecodeError) as e:
        log.warning("training curves skipped: %s unreadable (%s)", log_history, e)
        return False
    series: dict[str, tuple[list, list]] = {"loss": ([], []), "eval_loss": ([], []), "eval_wer": ([], [])}
    for entry in history if isinstance(history, list) else []:
        for key, (xs, ys) in series.items():
            if key in entry and "step" in entry:
                xs.append(entry["step"])
                ys.append(entry[key])
    if not any(xs for xs, _ in series.values()):
        log.warning("training curves skipped: %s has no loss/eval_loss/eval_wer entries", log_history)
        return False
    import matplotlib

    matplotlib.use("Agg")  # no display in a batch job
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for key, style in (("loss", "-"), ("eval_loss", "o-")):
        xs, ys = series[key]
        if xs:
            ax.plot(xs, ys, style, label=key.replace("_", " "))
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    handles, labels = ax.get_legend_handles_labels()
    xs, ys = series["eval_wer"]
    if xs:
        ax2 = ax.twinx()
        ax2.plot(xs, [y * LOG_HISTORY_WER_TO_PERCENT for y in ys], "s--", color="tab:red", label="eval WER (%)")
        ax2.set_ylabel("eval WER (%)")
        h2, l2 = ax2.get_legend_handles_labels()
        handles, labels = handles + h2, labels + l2
    ax.legend(handles, labels, loc="upper right")
    ax.set_title(log_history.parent.name)
    fig.tight_layout()
    fig.savefig(out_png, dpi=120)
    plt.close(fig)
    return True
