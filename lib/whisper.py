"""Whisper's facts, in one place: the window, the decoder's positions, the special tokens and
the label format the model was trained on.

    audio     16 kHz; one 30-s window = 480,000 samples = 3000 mel frames (10 ms hop)
              = 1500 encoder positions (the convolution strides by 2)
    decoder   448 positions; generate() starts from the 4-token prompt
              <|startoftranscript|><|lang|><|task|><|notimestamps|>, which leaves 444 new tokens
    labels    <|sot|> <|hi|> <|transcribe|> <|notimestamps|> text <|endoftext|>, or with
              timestamps on a 0.02-s grid <|sot|> <|hi|> <|transcribe|> <|0.00|> text <|7.34|> <|endoftext|>

Every special id is looked up in the base's tokenizer by name: large-v3 and turbo add <|yue|>
at 50358, which moves every id above it by one (v2 <|notimestamps|> 50363 -> v3 50364).
Nothing here imports torch or transformers: a config check can use it for free.
"""

from __future__ import annotations

from dataclasses import dataclass

from lib.errors import UserError

SAMPLING_RATE = 16_000
"""Whisper's input rate: every clip is decoded and resampled to it"""
WINDOW_SECONDS = 30
"""Whisper's encoder sees 30-s windows: 30 s x 100 frames/s = 3000 mel frames"""
MEL_FRAMES = 3000
"""log-mel frames of one window (10 ms hop)"""
ENCODER_POSITIONS = 1500
"""encoder positions of one window: the 3000 frames after the stride-2 convolution"""
EOT_ID = 50257
"""<|endoftext|> of every multilingual tokenizer (also its pad and bos)"""
SOT_ID = 50258
"""<|startoftranscript|> of every multilingual tokenizer: the decoder's start token"""
MAX_POSITIONS = 448
"""decoder positions of every released Whisper (max_target_positions)"""
PROMPT_TOKENS = 4
"""<|startoftranscript|><|lang|><|task|><|notimestamps|>: where generate() starts"""
MAX_NEW_TOKENS = MAX_POSITIONS - PROMPT_TOKENS
"""444: the most tokens one generate() call may add after the prompt"""
TIME_STEP = 0.02  # seconds per timestamp token: <|0.00|>, <|0.02|>, ... <|30.00|>
MAX_SECONDS = 30.0  # Whisper's window; the last timestamp token is <|30.00|>
MAX_PROMPT = 223  # Whisper's own cap on previous-text tokens: max_target_positions // 2 - 1
NO_SPEECH_NAMES = ("<|nospeech|>", "<|nocaptions|>")  # v3 (and newer v2 tokenizer files), older v2 files


def token_id(tokenizer, name: str) -> int | None:
    """The id of special token `name`, or None when the vocabulary lacks it (convert_tokens_to_ids
    answers unknown names with <|endoftext|>'s id, so the round trip is checked)."""
    i = tokenizer.convert_tokens_to_ids(name)
    if i is None or tokenizer.convert_ids_to_tokens(i) != name:
        return None
    return int(i)


def no_speech_id(tokenizer) -> int | None:
    """The id of the base's no-speech token (<|nospeech|>, or <|nocaptions|> in older v2 files), or None."""
    return next((i for i in (token_id(tokenizer, n) for n in NO_SPEECH_NAMES) if i is not None), None)


@dataclass(frozen=True)
class SpecialTokens:
    """The ids TrainingSamples and the collator write, from one tokenizer."""

    sot: int
    eot: int
    no_timestamps: int
    timestamp_begin: int
    """<|0.00|>; <|t|> is timestamp_begin + round(t / 0.02)"""
    start_of_prev: int
    no_speech: int

    @classmethod
    def of(cls, tokenizer) -> SpecialTokens:
        names = {"sot": "<|startoftranscript|>", "eot": "<|endoftext|>", "no_timestamps": "<|notimestamps|>",
                 "timestamp_begin": "<|0.00|>", "start_of_prev": "<|startofprev|>"}
        ids = {k: token_id(tokenizer, v) for k, v in names.items()}
        ids["no_speech"] = no_speech_id(tokenizer)
        missing = [names.get(k, "/".join(NO_SPEECH_NAMES)) for k, v in ids.items() if v is None]
        if missing:
            raise UserError(f"model.base: its tokenizer has no {', '.join(missing)} token: it is not a multilingual "
                            f"Whisper tokenizer; turn off train.timestamp_probability, train.prompt_probability "
                            f"and train.no_speech_fraction")
        last = token_id(tokenizer, "<|30.00|>")
        if last != ids["timestamp_begin"] + round(MAX_SECONDS / TIME_STEP):
            raise UserError(f"model.base: its tokenizer's timestamp tokens are not <|0.00|>..<|30.00|> in 0.02-s "
                            f"steps (<|30.00|> = {last}); turn off train.timestamp_probability")
        return cls(**ids)

    def timestamp(self, seconds: float) -> int:
        """<|t|> for t on the 0.02-s grid, at most <|30.00|>."""
        return self.timestamp_begin + round(min(max(seconds, 0.0), MAX_SECONDS) / TIME_STEP)


def split_label(labels: list[int], tok: SpecialTokens) -> tuple[list[int], list[int]]:
    """(prefix up to <|transcribe|>, text tokens) of a prepared label row
    `<|sot|> <|lang|> <|task|> <|notimestamps|> text <|endoftext|>`."""
    try:
        at = labels.index(tok.no_timestamps, 0, 5)
    except ValueError:
        raise UserError(f"a prepared label row does not start with <|startoftranscript|> ... <|notimestamps|> "
                        f"({labels[:5]}): prepare the data again with this base's tokenizer") from None
    end = len(labels) - 1 if labels and labels[-1] == tok.eot else len(labels)
    return labels[:at], labels[at + 1:end]


def timestamped(labels: list[int], seconds: float, tok: SpecialTokens) -> list[int]:
    """`... <|notimestamps|> text <|eot|>` -> `... <|0.00|> text <|seconds|> <|eot|>`: one segment
    spanning the clip (prepared clips are one sentence each)."""
    prefix, text = split_label(labels, tok)
    return prefix + [tok.timestamp(0.0)] + text + [tok.timestamp(seconds), tok.eot]


def segmented(labels: list[int], segments: list[tuple[float, float, list[int]]], tok: SpecialTokens) -> list[int]:
    """A prepared label row and [(start, end, text tokens)] -> `<|sot|> <|hi|> <|transcribe|>
    <|start 1|> text 1 <|end 1|> <|start 2|> text 2 <|end 2|> ... <|eot|>`: the prefix is the
    row's own, every timestamp on the 0.02-s grid (prepare builds a manifest's segments this way)."""
    prefix, _ = split_label(labels, tok)
    out = list(prefix)
    for start, end, text in segments:
        out += [tok.timestamp(start), *text, tok.timestamp(end)]
    return out + [tok.eot]


def rescaled(labels: list[int], speed: float, tok: SpecialTokens) -> list[int]:
    """Every timestamp token <|t|> of `labels` -> <|t / speed|> (the audio played `speed` times
    faster: 1.1 moves <|5.50|> to <|5.00|>), on the 0.02-s grid, at most <|30.00|>."""
    last = tok.timestamp(MAX_SECONDS)
    return [tok.timestamp((i - tok.timestamp_begin) * TIME_STEP / speed) if tok.timestamp_begin <= i <= last else i
            for i in labels]


def segments_of(labels: list[int], tok: SpecialTokens) -> list[tuple[float, float, list[int]]]:
    """A timestamped label row `<|sot|> <|hi|> <|transcribe|> <|0.00|> one <|2.40|> <|2.60|> two
    <|5.10|> <|eot|>` -> [(0.0, 2.4, one), (2.6, 5.1, two)]: segmented's input, read back (times
    in seconds on the 0.02-s grid). A row without timestamps has no segments: []."""
    last = tok.timestamp(MAX_SECONDS)
    out: list[tuple[float, float, list[int]]] = []
    start: float | None = None
    text: list[int] = []
    for i in labels:
        if tok.timestamp_begin <= i <= last:
            t = (i - tok.timestamp_begin) * TIME_STEP
            if start is None:
                start, text = t, []
            else:
                out.append((start, t, text))
                start = None
        elif start is not None and i != tok.eot:
            text.append(int(i))
    return out
