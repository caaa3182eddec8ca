"""Training samples beyond the prepared rows: timestamped and prompted labels, no-speech clips,
speed / gain / noise on the raw audio (train.timestamp_probability, train.prompt_probability,
train.no_speech_fraction, train.speed_perturb, train.gain_db, train.noise_snr_db).

Prepared labels are `<|startoftranscript|> <|hi|> <|transcribe|> <|notimestamps|> text
<|endoftext|>` (lib/prepared.py). Fine-tuning on those alone teaches the model to never emit
timestamps and to always write something, which is what breaks long-form decoding and makes it
hallucinate on silence. TrainingSamples wraps the train split and rewrites each row on the fly:

  timestamps  <|sot|> <|hi|> <|transcribe|> <|0.00|> text <|7.34|> <|endoftext|>
              (the end is the clip's duration after speed change, on Whisper's 0.02-s grid);
              a row whose manifest gave segments (prepared `ts_labels`, lib/shards.py) gets
              them instead, Whisper's own training format, one timestamp pair per segment:
              <|sot|> <|hi|> <|transcribe|> <|0.00|> one <|2.40|> <|2.60|> two <|5.10|> <|endoftext|>
              (with train.speed_perturb every timestamp divided by the speed, on the grid)
  prompt      `prompt` = the text tokens of the previous clip; the collator puts
              <|startofprev|> prompt before <|sot|> and masks it out of the loss
  no speech   silence / white / pink noise (or a clip of train.no_speech_dir), labelled
              <|sot|> <|nospeech|> <|endoftext|> (<|nocaptions|> in older v2 tokenizer files),
              or with train.no_speech_label=empty <|sot|> <|hi|> <|transcribe|> <|notimestamps|> <|endoftext|>

Every special id is looked up in the base's tokenizer by name: large-v3 and turbo add <|yue|>
at 50358, which moves every id above it by one (v2 <|notimestamps|> 50363 -> v3 50364).

Choices are drawn from a generator seeded with (train.seed, row index): the same seed gives the
same samples in any worker process, and a row gets the same choice in every epoch.
The prepared data has no speaker or recording column (lib/prepared.py COLUMNS), so the prompt is
the previous clip in the split's order: consecutive clips of one recording where the source
kept recordings together (a manifest of cut segments), unrelated sentences otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from lib.audio import SAMPLING_RATE
from lib.errors import UserError

TIME_STEP = 0.02  # seconds per timestamp token: <|0.00|>, <|0.02|>, ... <|30.00|>
MAX_SECONDS = 30.0  # Whisper's window; the last timestamp token is <|30.00|>
MAX_PROMPT = 223  # Whisper's own cap on previous-text tokens: max_target_positions // 2 - 1
MAX_POSITIONS = 448  # decoder positions of every released Whisper (max_target_positions)
NO_SPEECH_NAMES = ("<|nospeech|>", "<|nocaptions|>")  # v3 (and newer v2 tokenizer files), older v2 files
AUDIO_SUFFIXES = (".wav", ".flac", ".mp3", ".ogg", ".opus", ".m4a")


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


def pink_noise(n: int, rng: np.random.Generator) -> np.ndarray:
    """1/f noise: white noise shaped by 1/sqrt(f) in the frequency domain, unit RMS."""
    spectrum = np.fft.rfft(rng.standard_normal(n))
    f = np.arange(len(spectrum), dtype=np.float64)
    f[0] = 1.0
    x = np.fft.irfft(spectrum / np.sqrt(f), n)
    return x / max(float(np.sqrt(np.mean(x ** 2))), 1e-12)


def no_speech_audio(rng: np.random.Generator, files: list[Path]) -> np.ndarray:
    """A 1-30 s clip without speech (no_speech_clip's audio)."""
    return no_speech_clip(rng, files)[1]


def no_speech_clip(rng: np.random.Generator, files: list[Path]) -> tuple[str, np.ndarray]:
    """(kind, audio): a random 30-s window of one of `files` (kind "file"), or a generated 1-30 s
    clip: digital "silence", or "white" / "pink" noise at -70..-20 dBFS RMS (room tone to a loud fan)."""
    if files:
        from lib.audio import decode

        path = files[int(rng.integers(len(files)))]
        audio = decode(path)
        n = int(MAX_SECONDS * SAMPLING_RATE)
        if len(audio) > n:
            start = int(rng.integers(len(audio) - n + 1))
            audio = audio[start:start + n]
        return "file", audio.astype(np.float32)
    n = int(rng.uniform(1.0, MAX_SECONDS) * SAMPLING_RATE)
    kind = str(rng.choice(["silence", "white", "pink"]))
    if kind == "silence":
        return kind, np.zeros(n, np.float32)
    level = 10 ** (rng.uniform(-70.0, -20.0) / 20)
    x = rng.standard_normal(n) if kind == "white" else pink_noise(n, rng)
    return kind, np.clip(level * x, -1.0, 1.0).astype(np.float32)


# Eval's no-speech clips are drawn from their own stream, never one a training run with a
# plausible train.seed draws from (training uses (seed, row index)).
EVAL_SEED = 1_000_003


def eval_no_speech_clips(n: int, folder: str | None = None, flag: str = "no_speech_dir") -> list[tuple[str, np.ndarray]]:
    """The fixed set of `n` (kind, audio) clips eval scores for hallucination: the same clips in
    every eval, so base and adapter, and two runs, see the same silence and noise."""
    try:
        files = no_speech_files(folder)
    except UserError as e:
        raise UserError(str(e).replace("train.no_speech_dir", flag)) from None
    return [no_speech_clip(np.random.default_rng([EVAL_SEED, i]), files) for i in range(n)]


def no_speech_files(folder: str | None) -> list[Path]:
    """The audio files of train.no_speech_dir (recursively), sorted so the seed picks the same ones."""
    if not folder:
        return []
    root = Path(folder)
    if not root.is_dir():
        raise UserError(f"train.no_speech_dir={folder}: no such folder")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in AUDIO_SUFFIXES and p.is_file())
    if not files:
        raise UserError(f"train.no_speech_dir={folder}: no audio files ({', '.join(AUDIO_SUFFIXES)}) in it")
    return files


def change_speed(audio: np.ndarray, factor: float) -> np.ndarray:
    """Play `factor` times faster (pitch moves with it, as Kaldi's speed perturbation): resample
    as if recorded at factor x 16 kHz; 1.1 -> 10 s become 9.09 s."""
    import soxr

    return soxr.resample(audio, SAMPLING_RATE * factor, SAMPLING_RATE, quality="HQ").astype(np.float32)


def add_noise(audio: np.ndarray, snr_db: float, rng: np.random.Generator) -> np.ndarray:
    """White noise at `snr_db` below the clip's RMS (a silent clip gets none)."""
    rms = float(np.sqrt(np.mean(audio.astype(np.float64) ** 2))) if len(audio) else 0.0
    noise = rng.standard_normal(len(audio)) * rms * 10 ** (-snr_db / 20)
    return (audio + noise).astype(np.float32)


class TrainingSamples(Dataset):
    """The train split with train.* sample options applied per row; a torch map-style dataset.

    Rows 0..n-1 are the prepared rows; rows n.. (when train.no_speech_fraction > 0) are no-speech
    clips, so that they are that share of all samples: n x f / (1 - f) of them (1000 clips at
    0.1 -> 111 more). Each row is {audio, labels, prompt}: labels begin with <|startoftranscript|>
    like prepared ones; prompt is the previous text (empty = none), which the collator places.
    """

    def __init__(self, ds, tokenizer, t, seed: int | None = None):
        """ds: the train split (audio, labels columns, optionally ts_labels: a row's segments);
        t: lib.train_config.TrainSection."""
        self.ds, self.t = ds, t
        self.seed = t.seed if seed is None else seed
        self.n = len(ds)
        self.tok = SpecialTokens.of(tokenizer)
        self.files = no_speech_files(t.no_speech_dir) if t.no_speech_fraction > 0 else []
        f = t.no_speech_fraction
        self.n_no_speech = round(self.n * f / (1 - f)) if f > 0 else 0
        # A stream (lib/stream.py) gives each row its previous clip's labels (prev_labels); a
        # prepared split in memory (tests, tools) is in source order: the previous row's text.
        self.streamed = not hasattr(ds, "with_format")
        rows = ds if self.streamed else ds.with_format(None)
        self.texts = ([split_label(list(map(int, lab)), self.tok)[1] for lab in rows["labels"]]
                      if t.prompt_probability > 0 and not self.streamed else [])
        # The prefix of the data (<|sot|> <|hi|> <|transcribe|>), checked here rather than in a
        # dataloader worker mid-run; "empty" no-speech labels reuse it.
        self.prefix = split_label(list(map(int, rows[0]["labels"])), self.tok)[0] if self.n else []

    def __len__(self) -> int:
        return self.n + self.n_no_speech

    def rng(self, i: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, i])

    def __getitem__(self, i: int) -> dict[str, Any]:
        rng = self.rng(int(i))
        if i >= self.n:
            audio, _ = self.augment_audio(no_speech_audio(rng, self.files), rng)
            return {"audio": audio, "labels": self.no_speech_labels(), "prompt": [], "id": f"no-speech-{i - self.n}",
                    "corpus": "no-speech"}
        row = self.ds[int(i)]
        t = self.t
        # The same draws in the same order whatever is on, so that turning one option on keeps
        # every other option's choices for this row (augment_audio makes exactly four more).
        use_ts, use_prompt = rng.random() < t.timestamp_probability, rng.random() < t.prompt_probability
        audio, speed = self.augment_audio(np.asarray(row["audio"], dtype=np.float32), rng)
        labels = list(map(int, row["labels"]))
        if use_ts:
            segments = row.get("ts_labels")  # absent in folders prepared before the column existed
            if segments is not None and len(segments):
                ts = rescaled(list(map(int, segments)), speed, self.tok) if speed != 1 else list(map(int, segments))
            else:
                ts = timestamped(labels, len(audio) / SAMPLING_RATE, self.tok)
            # one token longer; the decoder sees all but the first (<|sot|> is its start token)
            labels = ts if len(ts) - 1 <= MAX_POSITIONS else labels
        # [<|startofprev|>] + prompt + labels[:-1] must fit the decoder's positions too
        room = MAX_POSITIONS - len(labels)
        prev = []
        if use_prompt and self.streamed:
            prev = split_label(list(map(int, row["prev_labels"])), self.tok)[1] if len(row["prev_labels"]) else []
        elif use_prompt and i > 0:
            prev = self.texts[i - 1]
        prompt = prev[-min(MAX_PROMPT, room):] if use_prompt and prev and room > 0 else []
        return {"audio": audio, "labels": labels, "prompt": prompt, "id": row.get("id", ""),
                "corpus": row.get("corpus", "")}

    def no_speech_labels(self) -> list[int]:
        """train.no_speech_label: "token" = <|sot|> <|nospeech|> <|eot|>, Whisper's own no-speech
        target (what its no-speech probability and long-form no_speech_threshold read); "empty" =
        <|sot|> <|hi|> <|transcribe|> <|notimestamps|> <|eot|>, an empty transcript under the prompt
        that forced-language decoding (eval, transcribe) feeds, which never asks for <|nospeech|>."""
        if self.t.no_speech_label == "empty":
            return [*self.prefix, self.tok.no_timestamps, self.tok.eot]
        return [self.tok.sot, self.tok.no_speech, self.tok.eot]

    def augment_audio(self, audio: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, float]:
        """(audio, the speed it now plays at: 1 = unchanged): speed, then gain, then noise, each
        only when its flag is on (four draws, always made; the noise samples come from a
        generator of their own)."""
        t = self.t
        speed = 1 + t.speed_perturb * (2 * rng.random() - 1)
        gain_db = t.gain_db * (2 * rng.random() - 1)
        snr = (t.noise_snr_db + 20 * rng.random()) if t.noise_snr_db is not None else None
        noise_rng = np.random.default_rng(rng.integers(2 ** 63))
        if t.speed_perturb and len(audio):
            # never past Whisper's 30-s window: a slowed 29-s clip would be cut and lose words
            speed = max(speed, len(audio) / (MAX_SECONDS * SAMPLING_RATE))
            audio = change_speed(audio, speed)
        else:
            speed = 1.0
        if t.gain_db:
            audio = np.clip(audio * 10 ** (gain_db / 20), -1.0, 1.0).astype(np.float32)
        if snr is not None:
            audio = add_noise(audio, snr, noise_rng)
        return audio, speed


class Interleave(Dataset):
    """TrainingSamples read by position, its no-speech rows spread among the clips: in every block of
    lib.stream.MIX_BLOCK positions, exactly train.no_speech_fraction of them (seeded places), so a
    sequential read (lib/stream.py: the Trainer reads in order) meets them all along the run."""

    def __init__(self, samples: TrainingSamples, length: int, seed: int):
        from lib.stream import Mixture

        f = samples.t.no_speech_fraction
        self.samples, self.length = samples, int(length)
        self.mix = Mixture([("data", None), ("no-speech", None)], [1 - f, f], seed, length=length)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, k: int) -> dict[str, Any]:
        j, i = self.mix.locate(int(k))
        s = self.samples
        return s[i % s.n] if j == 0 else s[s.n + i % s.n_no_speech]
