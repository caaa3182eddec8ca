"""Forgetting and language ID: what a fine-tune did to the languages it was not trained on.

`make eval also=en-clips,...` names more prepared datasets (any language). For each, on the
base and on the fine-tune:
  WER with the language forced   (the dataset's own language, from its manifest): can the
                                 model still transcribe it when told which language it is;
  language-ID accuracy           the language left to the model (Whisper's detect_language:
                                 the most likely <|xx|> token after <|startoftranscript|>)
                                 against each row's language column. A Hindi fine-tune that
                                 answers <|hi|> for English audio transcribes English as Hindi
                                 whenever the caller does not force the language.
A fine-tune whose accuracy drops more than forgetting_max_drop below the base's, or whose
WER rises more than forgetting_max_wer_rise above it, is flagged in the report and the log.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import Any

from lib.errors import UserError

log = logging.getLogger("whisper_ft")


def detect_languages(model, processor, ds, batch_size: int = 16) -> list[str]:
    """The language code Whisper detects for each clip of a prepared split (first 30 s)."""
    import torch

    from lib.dataset.prepared import audio_arrays
    from lib.inference import _model_dtype, features_for
    from lib.language import language_code

    device = next(model.parameters()).device
    out: list[str] = []
    for i in range(0, len(ds), batch_size):
        feats = features_for(processor, audio_arrays(ds, i, i + batch_size), _model_dtype(model), device)
        with torch.inference_mode():
            ids = model.detect_language(input_features=feats)
        out += [language_code(t) for t in processor.tokenizer.convert_ids_to_tokens([int(x) for x in ids])]
    return out


def lid_accuracy(predicted: Sequence[str], expected: Sequence[str]) -> dict[str, Any]:
    """Share of clips whose detected language is theirs, and what was detected (most common first)."""
    if len(predicted) != len(expected):
        raise ValueError(f"{len(predicted)} detected languages for {len(expected)} clips")
    right = sum(p == e for p, e in zip(predicted, expected, strict=True))
    return {"lid_accuracy": right / len(expected) if expected else 0.0, "lid_correct": right,
            "detected": dict(Counter(predicted).most_common(5))}


def drop_flags(name: str, results: dict[str, dict[str, Any]], max_drop: float, max_wer_rise: float,
               tuned: str = "adapter", base: str = "base") -> list[str]:
    """The report's warnings for one `also` dataset: LID accuracy more than max_drop below the
    base's, normalized WER more than max_wer_rise above it (both absolute, as fractions)."""
    if tuned not in results or base not in results:
        return []
    t, b = results[tuned], results[base]
    flags = []
    if b["lid_accuracy"] - t["lid_accuracy"] > max_drop:
        flags.append(f"{name}: language-ID accuracy fell from {100 * b['lid_accuracy']:.1f} % (base) to "
                     f"{100 * t['lid_accuracy']:.1f} %, more than forgetting_max_drop={max_drop:g}")
    if t["normalized_wer"] - b["normalized_wer"] > max_wer_rise:
        flags.append(f"{name}: WER with the language forced rose from {100 * b['normalized_wer']:.2f} % (base) to "
                     f"{100 * t['normalized_wer']:.2f} %, more than forgetting_max_wer_rise={max_wer_rise:g}")
    return flags


def evaluate_dataset(legs: dict[str, Callable[[], AbstractContextManager]], model, processor, ds, language: str,
                     task: str, batch_size: int, max_new_tokens: int, num_beams: int = 1, gate=None) -> dict[str, dict]:
    """Per leg: clip WER with `language` forced, and LID accuracy against the rows' language column."""
    from lib.inference import transcribe_dataset
    from lib.metrics import score

    refs, ids = ds["text"], ds["id"]
    expected = [str(x) for x in ds["language"]]
    out = {}
    for name, ctx in legs.items():
        with ctx():
            decoded, _ = transcribe_dataset(model, processor, ds, language, task, batch_size, max_new_tokens,
                                            desc=f"{name} ({language}, forced)", num_beams=num_beams, gate=gate)
            detected = detect_languages(model, processor, ds, batch_size)
        metrics, _ = score(refs, decoded.texts, ids, truncated=decoded.truncated)
        out[name] = {**{k: metrics[k] for k in ("normalized_wer", "wer", "cer", "empty", "repetition", "truncated")},
                     "judged_no_speech": sum(decoded.silent),
                     **lid_accuracy(detected, expected)}
    return out


def render(report: dict[str, Any]) -> list[str]:
    """report.md lines for the `also` datasets ([] when none were given)."""
    also = report.get("also")
    if not also:
        return []
    lines = ["", "## Other languages: forgetting and language ID", "",
             "| dataset | language | clips | metric | " + " | ".join(next(iter(also.values()))["results"]) + " |",
             "|---|---|---|---|" + "---|" * len(next(iter(also.values()))["results"])]
    for name, d in also.items():
        res = d["results"]
        names = list(res)
        head = f"| {name} | {d['language']} | {d['clips']} "
        lines.append(head + "| WER, normalized (language forced) | "
                     + " | ".join(f"{100 * res[n]['normalized_wer']:.2f} %" for n in names) + " |")
        lines.append(head + "| language-ID accuracy (language detected) | " + " | ".join(
            f"{100 * res[n]['lid_accuracy']:.1f} % ({', '.join(f'{k} {v}' for k, v in res[n]['detected'].items())})"
            for n in names) + " |")
    flags = report.get("forgetting_flags") or []
    if flags:
        lines += [""] + [f"- **flag**: {f}" for f in flags]
    elif len(next(iter(also.values()))["results"]) > 1:
        lines += ["", "- no drop beyond the thresholds (forgetting_max_drop, forgetting_max_wer_rise)"]
    else:
        lines += ["", "- one model scored, no base to compare with: no forgetting check"]
    return lines


def open_also(env, names: Sequence[str]) -> list[tuple[str, Any, dict[str, Any]]]:
    """(name, folder, manifest) of every also= dataset; eval opens them before any decoding, so
    that a misspelt name or a manifest without a language fails at once."""
    from lib.dataset.prepared import MANIFEST, open_prepared

    out = []
    for name in names:
        try:
            path, manifest = open_prepared(env, name)
        except UserError as e:
            raise UserError(f"also={name}: {e}") from None
        if not manifest.get("language"):
            raise UserError(f"also={name}: {path}/{MANIFEST} names no language; prepare it again with language=")
        out.append((name, path, manifest))
    return out


def evaluate_also(sets: Sequence[tuple[str, Any, dict[str, Any]]], split: str, limit: int | None, legs, model,
                  processor, task: str, batch_size: int, max_new_tokens: int | None, num_beams: int, max_drop: float,
                  max_wer_rise: float, gate=None) -> tuple[dict[str, Any], list[str]]:
    """The report's `also` section and its flags: every also= dataset (open_also) scored on every leg.

    Each dataset's language is its manifest's (the rows' language column is what LID is
    compared with); its token budget comes from its own labels, as for the main split.
    """
    from lib.dataset.prepared import MANIFEST, load_split
    from lib.inference import decode_budget
    from lib.language import resolve_language

    section: dict[str, Any] = {}
    flags: list[str] = []
    for name, path, manifest in sets:
        language = resolve_language(manifest["language"], processor.tokenizer, flag=f"also={name}: language",
                                    where=f"{path}/{MANIFEST}")
        ds = load_split(path, split, manifest)
        if limit:
            ds = ds.select(range(min(limit, len(ds))))
        if len(ds) == 0:
            raise UserError(f"also={name}: {path}/{split} has no rows (set also_split=)")
        budget = max_new_tokens or decode_budget([len(x) for x in ds.with_format(None)["labels"]])
        results = evaluate_dataset(legs, model, processor, ds, language, task, batch_size, budget, num_beams, gate)
        section[name] = {"data": str(path), "split": split, "language": language, "clips": len(ds),
                         "max_new_tokens": budget, "results": results}
        for leg, m in results.items():
            log.info("eval: also %s (%s) %-7s normalized WER %.2f %% (language forced), language ID %.1f %% "
                     "(detected %s)", name, language, leg, 100 * m["normalized_wer"], 100 * m["lid_accuracy"],
                     m["detected"])
        for f in drop_flags(name, results, max_drop, max_wer_rise):
            log.warning("eval: forgetting: %s", f)
            flags.append(f)
    return section, flags
