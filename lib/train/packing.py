"""Packing (train.pack): several nearby clips of the shuffled stream in one 30-s window.

Why: Whisper's encoder always sees 30 s. A 5-s Common Voice clip padded to the window is 500 of
3000 mel frames of audio, so about 5/6 of the encoder's work on such a corpus is padding; and a
fine-tune that only ever sees one short sentence per window, labelled <|notimestamps|>, forgets
long-form transcription (several timestamped segments per window: what Whisper was trained on
and what sequential long-form decoding asks for). A packed window holds nearby clips of one
corpus's stream with a seeded pause between two clips (train.pack_gap), and is labelled in
Whisper's multi-segment format, one segment per clip, every clip starting on the 0.02-s grid:

    <|sot|> <|hi|> <|transcribe|> <|0.00|> text 1 <|4.12|> <|4.80|> text 2 <|9.36|> ... <|eot|>

A clip whose manifest gave segments (its `ts_labels`) keeps them, shifted by its start in the
window. Besides these timestamped windows there are two other kinds, each a share of the windows
drawn from train.seed: single-clip windows (train.pack_single_fraction, default 10 %) hold one
clip with its prepared label, the form clip eval decodes; plain windows (train.pack_plain_fraction,
default 0) are packed the same way as the timestamped ones but labelled `<|notimestamps|> text 1
text 2 ...`, the clips' texts joined by a space. Measured on whisper-base (docs/results.md,
"Packed training and quality"), 20 % plain windows in place of the single-clip ones fill the GPU
better but left single-clip WER at 24 % (lr 1e-3; 3-6 % unpacked, 6.7 % with single-clip windows);
at auto's packed lr (2e-3) 10 % single-clip windows gave 1.1-4.6 % over 5 seeds, 20 % 1.4-4.3 %.

Positions -> windows (PackedStream, one corpus). Epoch e of a corpus's ShardStream is its positions
e*N .. e*N+N-1 (N clips, lib/train/stream.py). The plan of epoch e cuts them into W_e windows by
a walk in that order: a window starts at the first clip not yet placed and takes each later clip
that still fits both limits, passing over at most train.pack_lookahead clips that do not (first
fit within a short look ahead: windows of 5-s clips hold 26.5 s of speech on average instead of
24.3 s for strictly consecutive clips, train.pack_lookahead=0). The limits are exact for what the
window will hold:
  - audio: every clip at the slowest train.speed_perturb (1/(1-p) longer: 0.1 -> x1.111) plus
    1 ms of rounding, and after each but the last its own pause as drawn for it: a whole number
    of 0.02-s steps within train.pack_gap, drawn per clip and epoch from train.seed (the plan and
    the sample read the same draw), the next clip starting on the grid; all within 30 s: the
    window is never cut, whatever the speed draws;
  - tokens: prefix + every clip's segment tokens + <|eot|> within 448 + 1 (the decoder reads all
    but the first, <|sot|>), from the label lengths (text + 2 timestamps; a manifest's segments
    as they are; a plain label is never longer). A prompt (train.prompt_probability) takes only
    the room that is left.
A clip that alone exceeds a limit is a window of its own (labelled as today: its prepared label
when the timestamped one does not fit). Window w of the corpus is window w - (W_0 + ... + W_{e-1})
of the first epoch e where that is < W_e. So the windows of an epoch partition its positions:
every clip is read once per epoch, under DDP too (ranks read disjoint windows), and what sits at
window w is a pure function of (train.seed, the manifests, train.shuffle_buffer, the pack flags,
train.speed_perturb): a resumed run skips the consumed windows by index as before, without reading
one. Several corpora (data=a:0.7,b:0.3) are packed one by one and lib.train.stream.Mixture mixes
their windows, so a window never mixes languages or tasks; weights are shares of windows (without
weights: each corpus's windows of an epoch, one pass over each).

What is planned from, and what is held: the plan reads each train shard's `duration`, `labels`
and `ts_labels` columns once at start-up (lib.dataset.shards.read_shard with those columns: no
audio is read or decoded) and keeps 6 bytes a clip (duration float32, token cost int16). An
epoch's plan is its positions' rows (ShardStream.epoch_rows, int32), gathered costs, the per-clip
draws and one compiled walk (numba, lib/train/packing.py: _walk); it keeps per clip its place in
window order (int32) and its pause (uint16), per window one int32 start and a kind (int8), for at
most 2 epochs. Measured at 7 million clips: docs/results.md, "Packing plan at scale"
(`python -m lib.tools.bench_packing`).
A DataLoader worker holds those arrays (numpy: shared pages after fork, one copy under spawn; no
per-clip Python lists), plans a later epoch itself when it gets there, and reads only its own
windows' rows through ShardStream's bounded cache (a window's clips lie within a few dozen
positions of each other).

Augmentation, per window: train.speed_perturb and train.gain_db are drawn per clip before
packing (a clip is one speaker's recording; its segment times are divided by its speed);
train.noise_snr_db is added once to the whole window, pauses included (the room, not the
speaker: pure digital silence between noisy clips would mark the boundaries);
train.no_speech_fraction is the share of windows that are no-speech clips
(lib.train.augment.Interleave); train.prompt_probability prompts a window with its first clip's
previous text; SpecAugment masks the window's log-mel as it masks a clip's.
"""

from __future__ import annotations

import logging
import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from lib.dataset import shards
from lib.errors import UserError
from lib.train.augment import TrainingSamples, add_noise, change_speed
from lib.whisper import (
    MAX_POSITIONS,
    MAX_PROMPT,
    MAX_SECONDS,
    SAMPLING_RATE,
    TIME_STEP,
    SpecialTokens,
    rescaled,
    segmented,
    segments_of,
    split_label,
)

log = logging.getLogger("whisper_ft")

PLAN_COLUMNS = ["duration", "labels", "ts_labels"]
"""what the plan reads of a shard: never `audio`"""

GRID = round(SAMPLING_RATE * TIME_STEP)
"""samples per timestamp step: 16,000 x 0.02 = 320; every clip of a window starts on a multiple"""

CLIP_MARGIN = SAMPLING_RATE // 1000
"""samples budgeted per clip beyond duration x stretch: 1 ms (16 samples) covers the float32
duration column and the resampler's output length rounding (a sample or two)"""

SINGLE_DRAWS, WINDOW_DRAWS, PAUSE_DRAWS = 3, 4, 5
"""generator streams of the plan's window kinds, of a window's draws and of the plan's pauses;
ShardStream uses 0 and 1, Mixture 2, so no two draw the same numbers"""

STAMPED, SINGLE, PLAIN = 0, 1, 2
"""window kinds: several clips, timestamped; one clip with its prepared label; several clips, no timestamps"""


@dataclass(frozen=True)
class PackLimits:
    """What a window may hold, in the plan's units (samples and label tokens)."""

    window: int
    """audio samples of a window: 30 s x 16 kHz = 480,000"""
    pauses: tuple[int, int]
    """a pause's grid steps, fewest and most: train.pack_gap in 0.02-s steps (0.3-0.8 s: 15-40)"""
    stretch: float
    """the longest a clip can become: 1 / (1 - train.speed_perturb), 1 without speed change"""
    tokens: int
    """segment tokens of all clips together: 448 decoder positions - the prefix (<|sot|> <|hi|>
    <|transcribe|>: 3), as the window's label is prefix + segments + <|eot|> and the decoder reads
    all but its first token"""
    single_fraction: float = 0.0
    """train.pack_single_fraction"""
    plain_fraction: float = 0.0
    """train.pack_plain_fraction"""
    lookahead: int = 0
    """train.pack_lookahead"""
    margin: int = CLIP_MARGIN

    @classmethod
    def of(cls, t, prefix_tokens: int) -> PackLimits:
        """From lib.train.config.TrainSection `t` and the length of the data's label prefix."""
        return cls(window=round(MAX_SECONDS * SAMPLING_RATE), pauses=pause_steps(t.pack_gap),
                   stretch=1 / (1 - t.speed_perturb), tokens=MAX_POSITIONS - prefix_tokens,
                   single_fraction=t.pack_single_fraction, plain_fraction=t.pack_plain_fraction,
                   lookahead=t.pack_lookahead)

    def kinds(self, draws: np.ndarray) -> np.ndarray:
        """Each clip's kind (int8) from its uniform draw: SINGLE below single_fraction, then PLAIN
        below single_fraction + plain_fraction, else STAMPED. A window is the kind of its first clip."""
        kind = np.zeros(len(draws), np.int8)
        kind[draws < self.single_fraction + self.plain_fraction] = PLAIN
        kind[draws < self.single_fraction] = SINGLE
        return kind


def pause_steps(gap) -> tuple[int, int]:
    """train.pack_gap [min, max] seconds -> (fewest, most) whole 0.02-s steps within it."""
    lo, hi = (round(x / TIME_STEP, 6) for x in gap)
    return math.ceil(lo), max(math.ceil(lo), math.floor(hi))


def clip_tokens(label_lengths: np.ndarray, ts_lengths: np.ndarray, prefix_tokens: int) -> np.ndarray:
    """Each clip's tokens in a packed label, int16: `<|start|> text <|end|>` = its prepared label
    (prefix + <|notimestamps|> + text + <|eot|>) - prefix; a clip with a manifest's segments, those
    segments = its ts_labels (prefix + segments + <|eot|>) - prefix - 1."""
    cost = np.where(ts_lengths > 0, ts_lengths - prefix_tokens - 1, label_lengths - prefix_tokens)
    return np.clip(cost, 0, np.iinfo(np.int16).max).astype(np.int16)


def plan_windows(seconds: np.ndarray, tokens: np.ndarray, limits: PackLimits, kinds: np.ndarray | None = None,
                 pauses: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(order, starts, window kinds) of clips given in stream order: window j holds the clips
    order[starts[j]:starts[j+1]] (indices into `seconds`, in the window's order; starts[-1] =
    len(seconds)) and is of kind window_kinds[j] (its first clip's kind). `kinds`: each clip's
    (PackLimits.kinds; none: all STAMPED); `pauses`: each clip's pause after it in grid steps (none:
    the longest, limits.pauses[1], as an estimate of the worst case needs).

    The walk (the module docstring): a window starts at the first clip not yet placed, ends there if
    that clip is SINGLE or alone exceeds a limit, else takes each later clip that fits and passes
    over at most limits.lookahead that do not. Compiled (numba): 7 million clips in about a second."""
    n = len(seconds)
    index = np.int32 if n < 2**31 - 1 else np.int64
    # Samples as integers: exact sums (a float64 sum over 7 million clips drifts by microseconds).
    lengths = np.ceil(seconds.astype(np.float64) * (limits.stretch * SAMPLING_RATE)).astype(np.int64)
    lengths += limits.margin
    if pauses is None:
        pauses = np.full(n, limits.pauses[1], np.uint16)
    single = np.zeros(n, np.bool_) if kinds is None else kinds == SINGLE
    order = np.empty(n, dtype=index)
    starts = np.empty(n + 1, dtype=index)  # at most n windows; trimmed below
    w = _walker()(lengths, pauses, tokens, single, limits.window, limits.tokens, GRID, limits.lookahead, order, starts)
    del lengths, single
    starts = starts[:w + 1].copy()
    window_kinds = np.zeros(w, np.int8) if kinds is None else kinds[order[starts[:-1]]]
    return order, starts, window_kinds


def _walk(lengths, pauses, tokens, single, window, token_limit, grid, lookahead, order, starts):  # pragma: no cover
    """plan_windows' loop (compiled by _walker): fills order and starts, returns the window count.
    A clip placed at `cursor` (samples, on the grid) ends at cursor + its length; the next one
    starts at the grid step after that end plus the clip's pause in steps."""
    n = lengths.shape[0]
    placed = np.zeros(n, np.bool_)
    head, w, k = 0, 0, 0
    while k < n:
        while placed[head]:
            head += 1
        i = head
        starts[w] = k
        w += 1
        placed[i] = True
        order[k] = i
        k += 1
        if single[i] or lengths[i] > window or tokens[i] > token_limit:
            continue  # a window of its own
        cursor = ((lengths[i] + grid - 1) // grid + pauses[i]) * grid
        used = np.int64(tokens[i])
        misses = 0
        j = i + 1
        while j < n and misses <= lookahead and cursor < window:
            if not placed[j]:
                if cursor + lengths[j] <= window and used + tokens[j] <= token_limit:
                    placed[j] = True
                    order[k] = j
                    k += 1
                    cursor += ((lengths[j] + grid - 1) // grid + pauses[j]) * grid
                    used += tokens[j]
                else:
                    misses += 1
            j += 1
    starts[w] = n
    return w


_WALK = None


def _walker():
    """_walk compiled by numba (a dependency of librosa, in the lock), once per process: about a
    second; a forked DataLoader worker inherits it."""
    global _WALK
    if _WALK is None:
        from numba import njit

        _WALK = njit(nogil=True, cache=False)(_walk)
    return _WALK


def plan_columns(stream, tok: SpecialTokens) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """(seconds float32, label tokens int16 (clip_tokens), prefix) of every row of a ShardStream's
    split in source order, from each shard's duration/labels/ts_labels columns: no audio is read.
    Every row must carry the first row's prefix (<|sot|> <|lang|> <|task|>): a window holds one."""
    import pyarrow.compute as pc

    seconds, tokens, prefix = [], [], None
    for shard in stream.shards:
        t = shards.read_shard(shard["url"], columns=PLAN_COLUMNS)
        if t.num_rows != int(shard["rows"]):
            raise UserError(f"{shard['url']}: {t.num_rows} rows, but its manifest.json says {shard['rows']}: the "
                            f"dataset was changed after prepare; prepare it again")
        labels = t["labels"]
        if prefix is None:
            prefix = split_label(list(map(int, labels[0].as_py())), tok)[0]
        heads = pc.list_flatten(pc.list_slice(labels, 0, len(prefix))).to_numpy()
        lengths = pc.list_value_length(labels).to_numpy()
        if len(heads) != len(prefix) * t.num_rows or (heads.reshape(-1, len(prefix)) != prefix).any():
            raise UserError(f"data={stream.name}: rows of {shard['url']} start with another language or task token "
                            f"than the split's first row ({prefix}): train.pack puts consecutive rows in one window, "
                            f"so a corpus must be one language and task; prepare one corpus per language and mix "
                            f"them with data=a:0.7,b:0.3, or set train.pack=false")
        seconds.append(t["duration"].to_numpy().astype(np.float32))
        tokens.append(clip_tokens(lengths, pc.list_value_length(t["ts_labels"]).to_numpy(), len(prefix)))
    return np.concatenate(seconds), np.concatenate(tokens), prefix or []


class PackedStream(Dataset):
    """Window position w of one corpus -> the consecutive ShardStream positions it holds (see the
    module docstring); the item is the raw window {"rows", "single", "key", "id", ...}, which
    PackedSamples turns into a training sample."""

    def __init__(self, stream, t, columns: tuple[np.ndarray, np.ndarray, list[int]], part: int = 0,
                 length: int | None = None):
        """stream: the corpus's lib.train.stream.ShardStream; t: lib.train.config.TrainSection;
        columns: plan_columns(stream, ...) (PackedStream.read reads them); part: the corpus's place
        in data= (its draws differ from the other corpora's). Plans nothing yet: `n` plans epoch 0."""
        self.stream, self.part, self.seed, self.name = stream, int(part), stream.seed, stream.name
        self.seconds, self.tokens, self.prefix = columns
        if len(self.seconds) != stream.n or len(self.tokens) != stream.n:
            raise ValueError(f"plan columns of {len(self.seconds)} clips for a split of {stream.n}")
        self.limits = PackLimits.of(t, len(self.prefix))
        self._counts: list[int] = []  # windows of epochs 0, 1, ... planned so far: a few ints
        self._plans: OrderedDict[int, tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self.length = length

    def __getstate__(self):  # a spawned DataLoader worker plans its epochs itself (~0.5 s at 7 million clips)
        state = self.__dict__.copy()
        state["_plans"] = OrderedDict()
        return state

    @classmethod
    def read(cls, stream, tok: SpecialTokens, t, part: int = 0) -> PackedStream:
        """The corpus's windows, planned from its shards' columns (plan_columns: no audio)."""
        return cls(stream, t, plan_columns(stream, tok), part)

    @property
    def n(self) -> int:
        """Windows of the first epoch: the unit of steps per epoch and of an unweighted mixture."""
        return self.windows_of(0)

    def __len__(self) -> int:
        return self.n if self.length is None else self.length

    def plan(self, epoch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(order, starts, window kinds, pauses) of an epoch (plan_windows; order and pauses are per
        position within the epoch); the last 2 epochs' are kept."""
        if epoch in self._plans:
            self._plans.move_to_end(epoch)
            return self._plans[epoch]
        order = self.stream.epoch_rows(epoch)
        seconds, tokens = self.seconds[order], self.tokens[order]
        del order
        n = len(seconds)
        kinds = self.limits.kinds(np.random.default_rng([self.seed, epoch, SINGLE_DRAWS, self.part]).random(n, np.float32))
        lo, hi = self.limits.pauses
        pauses = np.random.default_rng([self.seed, epoch, PAUSE_DRAWS, self.part]).integers(lo, hi + 1, n, np.uint16)
        plan = (*plan_windows(seconds, tokens, self.limits, kinds, pauses), pauses)
        del seconds, tokens, kinds
        self._plans[epoch] = plan
        while len(self._plans) > 2:
            self._plans.popitem(last=False)
        return plan

    def windows_of(self, epoch: int) -> int:
        """W_epoch; planning the epochs before it first (their counts place its windows)."""
        while len(self._counts) <= epoch:
            self._counts.append(len(self.plan(len(self._counts))[2]))
        return self._counts[epoch]

    def locate(self, w: int) -> tuple[int, np.ndarray, int, np.ndarray]:
        """(epoch, stream positions in the window's order, kind, pauses in grid steps after each) of
        window w, from the plan alone."""
        if w < 0:
            raise IndexError(w)
        epoch, before = 0, 0
        while w >= before + self.windows_of(epoch):
            before += self._counts[epoch]
            epoch += 1
        order, starts, kinds, pauses = self.plan(epoch)
        j = w - before
        within = order[starts[j]:starts[j + 1]]
        return epoch, epoch * self.stream.n + within.astype(np.int64), int(kinds[j]), pauses[within]

    def __getitem__(self, w: int) -> dict[str, Any]:
        _, positions, kind, pauses = self.locate(int(w))
        rows = [self.stream[int(k)] for k in positions]
        return {"rows": rows, "kind": kind, "pauses": pauses.tolist(), "key": (self.part, int(w)),
                "id": "+".join(r["id"] for r in rows), "corpus": self.name, "position": int(w)}

    def describe(self) -> str:
        """'N clips -> W windows (mean X clips, Y s of audio per window)' of the first epoch."""
        n, w = len(self.seconds), self.n
        return (f"{n} clips -> {w} windows (mean {n / max(w, 1):.2f} clips, "
                f"{float(self.seconds.sum(dtype=np.float64)) / max(w, 1):.1f} s of audio per window)")


class PackedSamples(TrainingSamples):
    """Raw windows (a PackedStream, or a Mixture of them) -> training samples {audio, labels, prompt,
    id, corpus, clips, audio_seconds, clip_seconds}; rows n.. are no-speech clips, as in TrainingSamples (with
    Interleave spreading them, train.no_speech_fraction is their share of windows). `id` joins the
    window's clip ids with '+'; `clips` (0 for no speech), `audio_seconds` (the window's
    length, pauses included) and `clip_seconds` (its clips alone) are for metrics: the collator reads only audio, labels and prompt."""

    def __init__(self, ds, tokenizer, t, prefix: list[int], seed: int | None = None):
        super().__init__(ds, tokenizer, t, seed=seed, prefix=prefix)
        self.tokenizer = tokenizer  # plain windows' texts are joined and tokenized again

    def __getitem__(self, i: int) -> dict[str, Any]:
        if i >= self.n:
            row = super().__getitem__(i)
            seconds = len(row["audio"]) / SAMPLING_RATE
            return {**row, "clips": 0, "audio_seconds": seconds, "clip_seconds": seconds}
        win = self.ds[int(i)]
        rows, t = win["rows"], self.t
        rng = np.random.default_rng([self.seed, WINDOW_DRAWS, *win["key"]])
        use_prompt = rng.random() < t.prompt_probability
        packed = None if win["kind"] == SINGLE else self.pack(rows, win["pauses"], rng, plain=win["kind"] == PLAIN)
        if packed is None:  # a chosen single-clip window, or one clip that alone exceeds a limit
            audio, _ = self.augment_audio(np.asarray(rows[0]["audio"], dtype=np.float32), rng)
            labels = list(map(int, rows[0]["labels"]))
            clip_samples = len(audio)
        else:
            audio, labels, clip_samples = packed
        prompt = []
        if use_prompt and len(rows[0]["prev_labels"]):
            prev = split_label(list(map(int, rows[0]["prev_labels"])), self.tok)[1]
            # [<|startofprev|>] + prompt + labels[:-1] must fit the decoder's positions too
            room = MAX_POSITIONS - len(labels)
            prompt = prev[-min(MAX_PROMPT, room):] if room > 0 and prev else []
        return {"audio": audio, "labels": labels, "prompt": prompt, "id": win["id"], "corpus": win.get("corpus", ""),
                "clips": len(rows), "audio_seconds": len(audio) / SAMPLING_RATE,
                "clip_seconds": clip_samples / SAMPLING_RATE}

    def pack(self, rows: list[dict[str, Any]], pauses: list[int], rng: np.random.Generator,
             plain: bool = False) -> tuple[np.ndarray, list[int], int] | None:
        """(audio, label, samples of clip audio without the pauses) of a window's clips, or None for
        one clip that alone does not fit 30 s or 448 positions. The label is timestamped, or with
        `plain` the prepared form of the clips' texts joined by spaces. `pauses`: the plan's, in grid
        steps after each clip. Per clip two draws (speed, gain), then two for the window's noise,
        whatever is on: turning one option on keeps the other choices."""
        t, tok = self.t, self.tok
        pieces, segments, cursor = [], [], 0
        for row, pause in zip(rows, pauses, strict=True):
            speed = 1 + t.speed_perturb * (2 * rng.random() - 1)
            gain_db = t.gain_db * (2 * rng.random() - 1)
            audio = np.asarray(row["audio"], dtype=np.float32)
            if t.speed_perturb and len(audio):
                speed = max(speed, len(audio) / (MAX_SECONDS * SAMPLING_RATE))  # as augment_audio: never past 30 s
                audio = change_speed(audio, speed)
            else:
                speed = 1.0
            if t.gain_db:
                audio = np.clip(audio * 10 ** (gain_db / 20), -1.0, 1.0).astype(np.float32)
            seconds, offset = len(audio) / SAMPLING_RATE, cursor / SAMPLING_RATE
            ts = list(map(int, row.get("ts_labels") or ()))
            if ts:  # the manifest's segments, in the clip's time (after its speed), within the clip
                own = segments_of(rescaled(ts, speed, tok) if speed != 1 else ts, tok)
                own = [(min(s, seconds), min(e, seconds), text) for s, e, text in own]
            else:
                own = [(0.0, seconds, split_label(list(map(int, row["labels"])), tok)[1])]
            segments += [(offset + s, offset + e, text) for s, e, text in own]
            pieces.append((cursor, audio))
            # the next clip starts on the grid, so its <|start|> is exact and its segments shift by whole steps
            cursor += (-(-len(audio) // GRID) + int(pause)) * GRID
        snr = (t.noise_snr_db + 20 * rng.random()) if t.noise_snr_db is not None else None
        noise_rng = np.random.default_rng(rng.integers(2 ** 63))
        length = pieces[-1][0] + len(pieces[-1][1])
        labels = (self.plain_label(rows) if plain and len(rows) > 1
                  else segmented(list(map(int, rows[0]["labels"])), segments, tok))
        if len(rows) == 1 and (length > round(MAX_SECONDS * SAMPLING_RATE) or len(labels) - 1 > MAX_POSITIONS):
            return None
        if length > round(MAX_SECONDS * SAMPLING_RATE) or len(labels) - 1 > MAX_POSITIONS:
            raise UserError(f"packed window of clips {'+'.join(str(r['id']) for r in rows)}: {length / SAMPLING_RATE:.3f} "
                            f"s and {len(labels)} label tokens, beyond what its plan allowed from the shards' duration "
                            f"and labels columns: those columns disagree with the clips; prepare the data again")
        audio = np.zeros(length, dtype=np.float32)
        for start, piece in pieces:
            audio[start:start + len(piece)] = piece
        if snr is not None:
            audio = add_noise(audio, snr, noise_rng)
        return audio, labels, sum(len(piece) for _, piece in pieces)


    def plain_label(self, rows: list[dict[str, Any]]) -> list[int]:
        """`prefix <|notimestamps|> text 1 text 2 ... <|eot|>`: the clips' prepared texts, decoded,
        joined by a space and tokenized again (as one sentence after another would be); never
        longer than the timestamped label the plan counted (two timestamps a clip), else the texts'
        tokens joined by the space token."""
        texts = [split_label(list(map(int, r["labels"])), self.tok)[1] for r in rows]
        prefix = split_label(list(map(int, rows[0]["labels"])), self.tok)[0]
        joined = self.tokenizer(" ".join(self.tokenizer.decode(x).strip() for x in texts),
                                add_special_tokens=False).input_ids
        if len(joined) > sum(map(len, texts)) + len(texts):
            space = self.tokenizer(" ", add_special_tokens=False).input_ids
            joined = [i for k, x in enumerate(texts) for i in (space if k else []) + x]
        return [*prefix, self.tok.no_timestamps, *joined, self.tok.eot]


def packed_streams(streams: list[tuple[str, Any]], t, tokenizer) -> list[tuple[str, PackedStream]]:
    """[(name, PackedStream)] of [(name, ShardStream)], each corpus planned on its own (one
    language and task per window); logs what packing did, per corpus."""
    tok = SpecialTokens.of(tokenizer)
    out = [(name, PackedStream.read(s, tok, t, part=j)) for j, (name, s) in enumerate(streams)]
    for name, p in out:
        log.info("data: %s%s (train.pack: pauses %g-%g s, %.0f %% plain and %.0f %% single-clip windows, look "
                 "ahead %d clips, budget for speed x%.3f)", f"{name}: " if len(out) > 1 else "", p.describe(),
                 *t.pack_gap, 100 * t.pack_plain_fraction, 100 * t.pack_single_fraction, t.pack_lookahead,
                 p.limits.stretch)
    return out
