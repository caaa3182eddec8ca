"""Which language a job works in: one precedence order, one resolver, one error text.

Every job asks the same two questions:
  1. what was asked for: `language_setting()` takes the first that says it, in this order:
       the job's language= flag
       the run's config.yaml (what it was trained for)
       the adapter's generation_config.json
       the prepared dataset's manifest.json (what its labels carry)
       the model's generation_config (a merged or plain model)
  2. is it a language this Whisper knows: `resolve_language()` turns a code or a name
     ("hi", "Hindi") into the code, or fails naming the flag, the nearest language and the known
     codes. A language= flag is checked once before that, against Whisper's table, by run_job
     (`check_language()`): before any job reads data.
Prepare, train, eval, export and transcribe all go through both.
"""

from __future__ import annotations

import difflib
import json
from pathlib import Path
from typing import Any

from lib.errors import UserError


def known_languages(tokenizer) -> dict[str, str]:
    """Language code -> name for the codes that have a <|xx|> token in this tokenizer."""
    from transformers.models.whisper.tokenization_whisper import LANGUAGES

    unk = tokenizer.unk_token_id
    return {c: n for c, n in LANGUAGES.items() if tokenizer.convert_tokens_to_ids(f"<|{c}|>") not in (None, unk)}


def language_code(value) -> str:
    """A code or an English name as written ("hi", "Hindi", "<|hi|>") -> the code it names ("hi");
    unknown values come back lower-cased, for resolve_language (or prepare's row check) to refuse."""
    from transformers.models.whisper.tokenization_whisper import TO_LANGUAGE_CODE

    code = str(value).strip().strip("<|>").lower()
    return TO_LANGUAGE_CODE.get(code, code)


def _unknown(value, known: dict[str, str], flag: str, said: str, what: str) -> UserError:
    """The error for a language `known` (code -> name) lacks: the nearest code or name first
    (difflib: "hindu" -> hi, "eng" -> en), then every known code."""
    by_name = {name.lower(): code for code, name in known.items()}
    close = difflib.get_close_matches(language_code(value), [*known, *by_name], n=1)
    hint = "."
    if close:
        code = by_name.get(close[0], close[0])
        hint = f"; did you mean {flag}={code} ({known[code]})?"
    make = " (with make: LANG=hi)" if flag == "language" else ""
    return UserError(f"{flag}={value!r}{said} is not a language {what}{hint} Use an ISO code such as {flag}=hi"
                     f"{make}. Known codes: {', '.join(sorted(known))}")


def check_language(value, flag: str = "language") -> None:
    """Refuse a language no Whisper knows, by Whisper's own table (no tokenizer needed): run_job
    checks a language= flag this way before the job looks at data or models, so that
    `make train LANG=xx` is told about the language, not that cv_xx was never prepared.
    resolve_language still checks it against the base's tokenizer (yue is only in v3's)."""
    from transformers.models.whisper.tokenization_whisper import LANGUAGES

    if value in (None, "") or language_code(value) in LANGUAGES:
        return
    raise _unknown(value, LANGUAGES, flag, "", "Whisper knows")


def resolve_language(value: str, tokenizer, flag: str = "language", where: str = "") -> str:
    """'hi', 'Hindi' or 'hindi' -> 'hi'; anything else is a UserError naming the nearest known
    language and listing the valid codes (`where`: the file the value came from, when it was not the flag)."""
    langs = known_languages(tokenizer)
    code = language_code(value)
    if code not in langs:
        raise _unknown(value, langs, flag, f" (from {where})" if where else "", "this Whisper tokenizer knows")
    return code


FLAG = "the language= flag"


def _generation_config(adapter: str | None) -> dict[str, Any]:
    gen_file = Path(adapter) / "generation_config.json" if adapter else None
    return json.loads(gen_file.read_text()) if gen_file is not None and gen_file.is_file() else {}


def language_setting(flag: str | None = None, *, run_config: dict | None = None, adapter: str | None = None,
                     manifest: dict | None = None, model=None) -> tuple[str | None, str]:
    """(language, where it came from), the first that says it in the order of the module
    docstring; (None, "") when nothing does."""
    gen = getattr(model, "generation_config", None)
    for value, where in (
        (flag, FLAG),
        ((run_config or {}).get("language"), "the run's config.yaml"),
        (_generation_config(adapter).get("language"), "the adapter's generation_config.json"),
        ((manifest or {}).get("language"), "the prepared dataset's manifest.json"),
        (getattr(gen, "language", None), "the model's generation_config"),
    ):
        if value:
            return str(value), where
    return None, ""


def task_setting(flag: str | None = None, *, run_config: dict | None = None, adapter: str | None = None,
                 manifest: dict | None = None, model=None) -> str:
    """The task in the same order as the language, transcribe when nothing says it."""
    gen = getattr(model, "generation_config", None)
    for value in (flag, (run_config or {}).get("task"), _generation_config(adapter).get("task"),
                  (manifest or {}).get("task"), getattr(gen, "task", None)):
        if value in ("transcribe", "translate"):
            return value
    return "transcribe"


def job_language(tokenizer, flag: str | None = None, **sources) -> str:
    """language_setting() then resolve_language(): the code this job uses, or a UserError."""
    value, where = language_setting(flag, **sources)
    if not value:
        raise UserError(
            "language is not set, and neither the run, the adapter, the prepared dataset nor the model "
            "says it: set language=hi (an ISO code)"
        )
    return resolve_language(value, tokenizer, where="" if where == FLAG else where)
