"""Training samples beyond the prepared rows: timestamped and prompted labels, no-speech clips,
speed / gain / noise on the raw audio (train.timestamp_probability, train.prompt_probability,
train.no_speech_fraction, train.speed_perturb, train.gain_db, train.noise_snr_db).

Prepared labels are `<|startoftranscript|> <|hi|> <|transcribe|> <|notimestamps|> text
<|endoftext|>` (lib/dataset/prepared.py). Fine-tuning on those alone teaches the model to never emit
timestamps and to always write something, which is what breaks long-form decoding and makes it
hallucinate on silence. TrainingSamples wraps the train split and rewrites each row on the fly:

  timestamps  <|sot|> <|hi|> <|transcribe|> <|0.00|> text <|7.34|> <|endoftext|>
              (the end is the clip's duration after speed change, on Whisper's 0.02-s grid);
              a row whose manifest gave segments (prepared `ts_labels`, lib/dataset/shards.py) gets
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
The prepared data has no speaker or recording column (lib/dataset/prepared.py COLUMNS), so the prompt is
the previous clip in the split's order: consecutive clips of one recording where the source
kept recordings together (a manifest of cut segments), unrelated sentences otherwise.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from lib.errors import UserError
from lib.whisper import (
    MAX_POSITIONS,
    MAX_PROMPT,
    MAX_SECONDS,
    SAMPLING_RATE,
    SpecialTokens,
    rescaled,
    split_label,
    timestamped,
)

AUDIO_SUFFIXES = (".wav", ".flac", ".mp3", ".ogg", ".opus", ".m4a")


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

    def __init__(self, ds, tokenizer, t, seed: int | None = None, prefix: list[int] | None = None):
        """ds: the train split (audio, labels columns, optionally ts_labels: a row's segments);
        t: lib.train.config.TrainSection; prefix: <|sot|> <|hi|> <|transcribe|> of the data when the
        caller knows it (lib/train/packing.py), else read from the first row."""
        self.ds, self.t = ds, t
        self.seed = t.seed if seed is None else seed
        self.n = len(ds)
        self.tok = SpecialTokens.of(tokenizer)
        self.files = no_speech_files(t.no_speech_dir) if t.no_speech_fraction > 0 else []
        f = t.no_speech_fraction
        self.n_no_speech = round(self.n * f / (1 - f)) if f > 0 else 0
        # A stream (lib/train/stream.py) gives each row its previous clip's labels (prev_labels); a
        # prepared split in memory (tests, tools) is in source order: the previous row's text.
        self.streamed = not hasattr(ds, "with_format")
        rows = ds if self.streamed else ds.with_format(None)
        self.texts = ([split_label(list(map(int, lab)), self.tok)[1] for lab in rows["labels"]]
                      if t.prompt_probability > 0 and not self.streamed else [])
        # The prefix of the data (<|sot|> <|hi|> <|transcribe|>), checked here rather than in a
        # dataloader worker mid-run; "empty" no-speech labels reuse it.
        if prefix is None:
            prefix = split_label(list(map(int, rows[0]["labels"])), self.tok)[0] if self.n else []
        self.prefix = list(prefix)

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
    lib.train.stream.MIX_BLOCK positions, exactly train.no_speech_fraction of them (seeded places), so a
    sequential read (lib/train/stream.py: the Trainer reads in order) meets them all along the run."""

    def __init__(self, samples: TrainingSamples, length: int, seed: int):
        from lib.train.stream import Mixture

        f = samples.t.no_speech_fraction
        self.samples, self.length = samples, int(length)
        self.mix = Mixture([("data", None), ("no-speech", None)], [1 - f, f], seed, length=length)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, k: int) -> dict[str, Any]:
        j, i = self.mix.locate(int(k))
        s = self.samples
        return s[i % s.n] if j == 0 else s[s.n + i % s.n_no_speech]
