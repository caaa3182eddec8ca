"""Word and character error rates, the text normalizers they use, and hypothesis sanity flags.

Three views of the same transcripts, each labelled for what it is:
  wer / cer              the exact text (case, punctuation and all) - the strictest number;
  normalized_wer / _cer  `normalize()`: NFKC, casefold, punctuation and symbols (the danda
                         "।" included) to spaces, whitespace collapsed. Combining marks
                         (Unicode M*: Devanagari vowel signs, virama, nukta) are KEPT, so a
                         wrong matra is still an error. This is the number to track;
  basic_normalized_wer   Whisper's BasicTextNormalizer, only "for comparison with published
                         numbers": it deletes combining marks, so
                         "हमने उसका जन्मदिन मनाया।" -> "हमन उसक जन मद न मन य"
                         and real vowel-sign errors disappear from the score.

Every view first takes `canonical()`, the spelling `make prepare` writes into the training
targets (NFC, ASCII digits, no zero-width joiners), so training and scoring agree on what
"the same text" is.

Corpus rates are total edits / total reference words (or characters), not a mean of
per-utterance rates: 1 error in a 2-word clip and 0 in a 98-word clip is 1 %, not 25 %.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence
from dataclasses import asdict, dataclass

BASIC_LABEL = (
    "basic-normalized WER, for comparison with published numbers; "
    "deletes Devanagari vowel signs"
)

# A hypothesis longer than this many times its reference (in characters, plus slack for
# very short references) is flagged as a probable hallucination.
TOO_LONG_RATIO = 2.0
TOO_LONG_SLACK = 10
# The same n-gram (n = 1..4 words) this many times in a row is a repetition loop.
REPEAT_MIN = 4
REPEAT_MAX_N = 4

_SPACE = re.compile(r"\s+")
# Characters that change how a word is drawn, never which word it is: zero-width non-joiner
# and joiner (in Devanagari they pick "क्‌ष" or a half form "क्‍ष" over the conjunct "क्ष"),
# zero-width space, a stray byte-order mark, soft hyphen. Left in, "क्ष" and "क्‍ष" are two
# words to the scorer and two token sequences to the model.
_INVISIBLE = dict.fromkeys(map(ord, "\u200c\u200d\u200b\ufeff\u00ad"))


def _ascii_digit(m: re.Match) -> str:
    return str(unicodedata.decimal(m.group()))


# \d on a str pattern is every Unicode decimal digit (Nd): Devanagari "२", Arabic-Indic, ...
_DIGIT = re.compile(r"[^0-9\D]")


def canonical(text: str) -> str:
    """The one spelling of a transcript: the form `make prepare` trains on and every score compares.

    NFC (so "ज़" typed as one code point or as ज + nukta are the same letters), decimal digits
    of any script as ASCII ("२०२४" -> "2024", as Whisper writes numbers in Hindi), the
    invisible joiners above removed, whitespace collapsed. Case and punctuation stay: this
    is still the exact text, only without spellings a reader cannot see.

    >>> canonical("वर्ष २०२४ में\u200d")
    'वर्ष 2024 में'
    """
    text = unicodedata.normalize("NFC", text).translate(_INVISIBLE)
    text = _DIGIT.sub(_ascii_digit, text)
    return _SPACE.sub(" ", text).strip()


def normalize(text: str) -> str:
    """canonical(), then NFKC, casefold, punctuation/symbols to spaces; keeps combining marks.

    >>> normalize("हमने उसका जन्मदिन मनाया।")
    'हमने उसका जन्मदिन मनाया'
    """
    text = unicodedata.normalize("NFKC", canonical(text)).casefold()
    # Categories P* (punctuation, "।" and "॥" are Po) and S* (symbols) become spaces;
    # M* (combining marks) and everything else stay.
    text = "".join(" " if unicodedata.category(ch)[0] in "PS" else ch for ch in text)
    return _SPACE.sub(" ", text).strip()


def basic_normalize(text: str) -> str:
    """Whisper's BasicTextNormalizer (deletes combining marks: see the module docstring)."""
    from transformers.models.whisper.english_normalizer import BasicTextNormalizer

    return BasicTextNormalizer()(text)


@dataclass
class Rates:
    """Edit counts over a corpus; the rate is errors / ref_units."""

    errors: int
    ref_units: int
    substitutions: int
    deletions: int
    insertions: int

    @property
    def rate(self) -> float:
        # An empty reference set with any insertion counts as 100 % (jiwer does the same).
        if self.ref_units == 0:
            return 0.0 if self.errors == 0 else 1.0
        return self.errors / self.ref_units


def _per_utterance_errors(out, n: int) -> list[int]:
    errors = []
    for chunks in out.alignments:
        e = 0
        for c in chunks:
            if c.type in ("substitute", "delete"):
                e += c.ref_end_idx - c.ref_start_idx
            elif c.type == "insert":
                e += c.hyp_end_idx - c.hyp_start_idx
        errors.append(e)
    assert len(errors) == n
    return errors


def word_errors(refs: Sequence[str], hyps: Sequence[str]) -> tuple[Rates, list[int], list[int]]:
    """Corpus word edits plus, per utterance, (word errors, reference words)."""
    import jiwer

    if len(refs) != len(hyps):
        raise ValueError(f"{len(refs)} references but {len(hyps)} hypotheses")
    if not refs:
        return Rates(0, 0, 0, 0, 0), [], []
    # jiwer splits on whitespace; an all-blank string is an empty sentence.
    out = jiwer.process_words([r.strip() for r in refs], [h.strip() for h in hyps])
    per = _per_utterance_errors(out, len(refs))
    ref_words = [len(r.split()) for r in refs]
    rates = Rates(
        errors=out.substitutions + out.deletions + out.insertions,
        ref_units=sum(ref_words),
        substitutions=out.substitutions,
        deletions=out.deletions,
        insertions=out.insertions,
    )
    return rates, per, ref_words


def char_errors(refs: Sequence[str], hyps: Sequence[str]) -> Rates:
    """Corpus character edits (spaces count as characters, as in jiwer's CER)."""
    import jiwer

    if not refs:
        return Rates(0, 0, 0, 0, 0)
    out = jiwer.process_characters(list(refs), list(hyps))
    return Rates(
        errors=out.substitutions + out.deletions + out.insertions,
        ref_units=sum(len(r) for r in refs),
        substitutions=out.substitutions,
        deletions=out.deletions,
        insertions=out.insertions,
    )


def wer(refs: Sequence[str], hyps: Sequence[str]) -> float:
    return word_errors(refs, hyps)[0].rate


def cer(refs: Sequence[str], hyps: Sequence[str]) -> float:
    return char_errors(refs, hyps).rate


def repeated_ngram(text: str, min_repeats: int = REPEAT_MIN, max_n: int = REPEAT_MAX_N) -> str | None:
    """The first n-gram (n <= max_n words) repeated min_repeats+ times in a row, else None.

    Scripts written without spaces (Chinese, Japanese, Thai) have too few "words": for
    them the same test runs on characters, with n up to 4 * max_n.
    """
    units, joiner = text.split(), " "
    if len(units) < min_repeats:
        units, joiner, max_n = list(text.replace(" ", "")), "", 4 * max_n
    for n in range(1, max_n + 1):
        for start in range(0, len(units) - n * min_repeats + 1):
            gram = units[start:start + n]
            reps, pos = 1, start + n
            while units[pos:pos + n] == gram:
                reps, pos = reps + 1, pos + n
            if reps >= min_repeats:
                return joiner.join(gram)
    return None


def hypothesis_flags(ref: str, hyp: str) -> list[str]:
    """Sanity flags for one normalized pair: empty, repetition loop, much longer than reference."""
    flags = []
    if not hyp.strip():
        if ref.strip():
            flags.append("empty")
        return flags
    if repeated_ngram(hyp) is not None:
        flags.append("repetition")
    if len(hyp) > TOO_LONG_RATIO * len(ref) + TOO_LONG_SLACK:
        flags.append("too_long")
    return flags


@dataclass
class Utterance:
    """One scored row, as predictions.tsv writes it."""

    id: str
    reference: str
    hypothesis: str
    word_errors: int
    ref_words: int
    flags: list[str]


def score(refs: Sequence[str], hyps: Sequence[str], ids: Sequence[str] | None = None,
          truncated: Sequence[bool] | None = None) -> tuple[dict, list[Utterance]]:
    """All corpus metrics plus one Utterance per row (word errors on normalized text);
    `truncated`: the rows whose hypothesis ran out of tokens, flagged and counted."""
    ids = list(ids) if ids is not None else [str(i) for i in range(len(refs))]
    # Every view scores the canonical spelling, the one prepare trained on: "२०२४" vs "2024"
    # or a zero-width joiner is not an error a listener could hear.
    refs, hyps = [canonical(r) for r in refs], [canonical(h) for h in hyps]
    n_refs = [normalize(r) for r in refs]
    n_hyps = [normalize(h) for h in hyps]
    raw_w = word_errors(refs, hyps)[0]
    norm_w, per, ref_words = word_errors(n_refs, n_hyps)
    basic_w = word_errors([basic_normalize(r) for r in refs], [basic_normalize(h) for h in hyps])[0]
    utts = [
        Utterance(i, r, h, e, w, hypothesis_flags(nr, nh))
        for i, r, h, e, w, nr, nh in zip(ids, refs, hyps, per, ref_words, n_refs, n_hyps, strict=True)
    ]
    for u, cut in zip(utts, truncated or [False] * len(utts), strict=True):
        if cut:
            u.flags.append("truncated")
    metrics = {
        "wer": raw_w.rate,
        "cer": char_errors(refs, hyps).rate,
        "normalized_wer": norm_w.rate,
        "normalized_cer": char_errors(n_refs, n_hyps).rate,
        "basic_normalized_wer": basic_w.rate,
        "normalized_word_edits": asdict(norm_w),
        "utterances": len(refs),
        "empty": sum("empty" in u.flags for u in utts),
        "repetition": sum("repetition" in u.flags for u in utts),
        "too_long": sum("too_long" in u.flags for u in utts),
        "truncated": sum("truncated" in u.flags for u in utts),
    }
    return metrics, utts


def hallucination(hyps: Sequence[str], kinds: Sequence[str]) -> dict:
    """How often a model writes something for audio without speech: {clips, with_text, rate,
    by_kind: {kind: rate}}. "Something" is any text left after normalize (a lone "." is nothing)."""
    said = [bool(normalize(canonical(h)).strip()) for h in hyps]
    by_kind: dict[str, list[bool]] = {}
    for kind, s in zip(kinds, said, strict=True):
        by_kind.setdefault(kind, []).append(s)
    return {"clips": len(said), "with_text": sum(said), "rate": sum(said) / len(said) if said else float("nan"),
            "by_kind": {k: sum(v) / len(v) for k, v in sorted(by_kind.items())}}
