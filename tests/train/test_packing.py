"""Packing (lib/train/packing.py, train.pack): the window plan (seeded, every clip once per epoch,
30 s and 448 positions with worst-case pauses and speed, from the shards' columns without audio),
the timestamped multi-segment labels, several corpora, the sample options, exact resume and DDP."""

import json
import math
import os
import pickle
import re
import subprocess
import sys
from itertools import pairwise
from pathlib import Path

import numpy as np
import pytest
from transformers import WhisperFeatureExtractor, WhisperTokenizer

from jobs.train import main
from lib.config import load_config
from lib.dataset import shards
from lib.dataset.corpora import parse_data
from lib.dataset.prepared import open_prepared
from lib.env import Env
from lib.errors import UserError
from lib.train.collator import WhisperCollator
from lib.train.config import TrainConfig, TrainSection
from lib.train.packing import (
    PLAIN,
    SINGLE,
    STAMPED,
    PackedSamples,
    PackedStream,
    PackLimits,
    plan_windows,
)
from lib.train.stream import ShardStream
from lib.whisper import (
    MAX_POSITIONS,
    SAMPLING_RATE,
    TIME_STEP,
    SpecialTokens,
    segmented,
    segments_of,
)
from tests.helpers import TOKENIZER_DIR, tone, write_prepared

ROOT = Path(__file__).resolve().parents[2]
SR = SAMPLING_RATE
WORDS = ["नमस्ते", "धन्यवाद", "हाँ", "नहीं", "पानी", "घर", "जी", "आप"]
EN_WORDS = ["hello", "yes", "water", "house", "thanks", "no"]
SECONDS = [3.0, 4.5, 6.0, 7.5, 2.0]  # Common Voice-like: 4.6 s on average, ~5 clips a window
SENTENCE = "हमने उसका जन्मदिन मनाया"


def a_text(i: int) -> str:
    return WORDS[i % 8]


@pytest.fixture(scope="module")
def tokenizer():
    return WhisperTokenizer.from_pretrained(TOKENIZER_DIR, language="hi", task="transcribe")


@pytest.fixture(scope="module")
def tok(tokenizer):
    return SpecialTokens.of(tokenizer)


@pytest.fixture(scope="module")
def root(tmp_path_factory, tiny_model_dir, tokenizer):
    """DATA_DIR with prepared/a (40 Hindi clips of 2-7.5 s, shards of 7, speakers of 4 clips), en (12
    English clips), seg (6 clips of 3 s, every other one with a manifest's two segments) and long
    (8 clips of 1 s whose labels are 100-180 tokens)."""
    d = tmp_path_factory.mktemp("data")
    a = [(a_text(i), tone(SECONDS[i % 5], 200 + 7 * i)) for i in range(40)]
    write_prepared(d / "prepared" / "a", tiny_model_dir, {"train": a}, shard_rows=7,
                   speakers={"train": [f"s{i // 4}" for i in range(40)]})
    en = [(EN_WORDS[i % 6], tone(2.0 + i % 4, 500 + 9 * i)) for i in range(12)]
    write_prepared(d / "prepared" / "en", tiny_model_dir, {"train": en}, language="en", shard_rows=5)
    t = SpecialTokens.of(tokenizer)
    seg = [(WORDS[i], tone(3.0, 300 + 11 * i)) for i in range(6)]
    text = [tokenizer(w, add_special_tokens=False).input_ids for w in ("एक", "दो")]
    ts = [segmented(tokenizer(WORDS[i]).input_ids, [(0.0, 1.2, text[0]), (1.5, 2.8, text[1])], t) if i % 2 == 0
          else [] for i in range(6)]
    write_prepared(d / "prepared" / "seg", tiny_model_dir, {"train": seg}, ts_labels={"train": ts})
    long = [(" ".join([SENTENCE] * (5 + i % 5)), tone(1.0, 700 + 13 * i)) for i in range(8)]
    write_prepared(d / "prepared" / "long", tiny_model_dir, {"train": long}, shard_rows=3)
    return d


def stream(root, name, seed=0, buffer=8) -> ShardStream:
    where, manifest = open_prepared(Env(data_dir=root), name)
    return ShardStream(where, manifest, "train", seed, buffer, name=name)


def packed(root, name, tok, seed=0, **flags) -> PackedStream:
    return PackedStream.read(stream(root, name, seed), tok, TrainSection(pack=True, **flags))


def samples(root, name, tokenizer, seed=0, **flags) -> PackedSamples:
    t = TrainSection(pack=True, seed=seed, **flags)
    ps = PackedStream.read(stream(root, name, seed), SpecialTokens.of(tokenizer), t)
    ps.length = ps.windows_of(0) + ps.windows_of(1)
    return PackedSamples(ps, tokenizer, t, ps.prefix)


def stamps(tok, labels) -> list[float]:
    return [round((i - tok.timestamp_begin) * TIME_STEP, 2) for i in labels if i >= tok.timestamp_begin]


def windows(starts: np.ndarray) -> list[int]:
    return np.diff(starts).tolist()


# ---------------------------------------------------------------- the plan


def test_windows_partition_every_epoch_in_a_seeded_order(root, tok):
    s = packed(root, "a", tok, seed=3)
    w0, w1 = s.windows_of(0), s.windows_of(1)
    assert 40 / 8 < w0 < 40 / 3  # several clips a window (4.6 s on average, 30 s windows)
    spans = [s.locate(w) for w in range(w0 + w1)]
    # none skipped or repeated: epoch 0 is positions 0..39, epoch 1 is 40..79; a window's clips in
    # stream order, each window starting at the first clip not yet placed
    assert [e for e, *_ in spans] == [0] * w0 + [1] * w1
    for epoch, part in ((0, spans[:w0]), (1, spans[w0:])):
        assert sorted(np.concatenate([p for _, p, _, _ in part]).tolist()) == list(range(40 * epoch, 40 * epoch + 40))
        placed = set()
        for _, p, _, _ in part:
            assert (np.diff(p) > 0).all() and p[0] == min(set(range(40 * epoch, 40 * epoch + 40)) - placed)
            placed |= set(p.tolist())
    assert any((np.diff(p) > 1).any() for _, p, _, _ in spans)  # some window reached past a clip that did not fit
    ids = [s[w]["id"].split("+") for w in range(w0 + w1)]
    for epoch in (ids[:w0], ids[w0:]):
        assert sorted(sum(epoch, [])) == sorted(f"train-{i}" for i in range(40))  # every clip once an epoch
    assert ids[:w0] != ids[w0:]  # each epoch its own order and windows
    # the plan's vectorized epoch order is ShardStream.locate's, position by position
    st = s.stream
    firsts = np.cumsum(st.rows) - np.asarray(st.rows)
    for epoch in (0, 1):
        assert st.epoch_rows(epoch).tolist() == [int(firsts[sh]) + r for sh, r in (st.locate(k) for k in
                                                                                  range(40 * epoch, 40 * epoch + 40))]
    again = packed(root, "a", tok, seed=3)  # another process, reading windows in any order
    assert [again[w]["id"].split("+") for w in reversed(range(w0 + w1))] == ids[::-1]
    other = packed(root, "a", tok, seed=4)
    assert [other[w]["id"].split("+") for w in range(other.windows_of(0))] != ids[:w0]
    strict = packed(root, "a", tok, seed=3, pack_lookahead=0)  # consecutive clips only
    runs = [strict.locate(w)[1] for w in range(strict.windows_of(0))]
    assert all((np.diff(p) == 1).all() for p in runs) and [p[0] for p in runs[1:]] == [p[-1] + 1 for p in runs[:-1]]


def test_the_plan_reads_no_audio(root, tok, monkeypatch):
    read = []
    real = shards.read_shard

    def spy(url, columns=None):
        read.append(columns)
        return real(url, columns=columns)

    monkeypatch.setattr(shards, "read_shard", spy)

    def no_decoding(*a, **k):
        raise AssertionError("audio decoded")

    monkeypatch.setattr(shards, "decode_audio", no_decoding)
    s = packed(root, "a", tok, speed_perturb=0.1)
    s.plan(1)
    s.locate(s.windows_of(0) + s.windows_of(1) + 1)  # epoch 2 planned too
    assert read and all("audio" not in c for c in read)
    with pytest.raises(AssertionError, match="audio decoded"):  # the patch is live: a window's rows decode
        s[0]


def fill(order, starts, lengths, pauses):
    """Each window's audio end in samples, as PackedSamples.pack places its clips: every clip on the
    grid, the next one after its grid-rounded length and its pause."""
    grid = round(TIME_STEP * SR)
    out = []
    for a, b in pairwise(starts):
        clips = order[a:b]
        out.append(sum((-(-int(lengths[c]) // grid) + int(pauses[c])) * grid for c in clips[:-1]) + lengths[clips[-1]])
    return np.asarray(out)


def test_windows_fit_30_s_with_their_pauses_and_the_slowest_speed():
    def plan(seconds, pauses=None, **flags):
        limits = PackLimits.of(TrainSection(pack=True, pack_lookahead=0, **flags), prefix_tokens=3)
        tokens = np.full(len(seconds), 10, np.int16)
        return windows(plan_windows(np.asarray(seconds, np.float32), tokens, limits, pauses=pauses)[1])

    nine = [9.5] * 12
    assert plan(nine, pack_gap=[0.3, 0.5]) == [3] * 4  # 3 x 9.52 (on the grid) + 2 x 0.5 = 29.54 s at the longest pause
    assert plan(nine, pack_gap=[0.3, 0.8]) == [2] * 6  # 28.54 + 2 x 0.8 = 30.14 s: one clip less
    assert plan(nine, np.full(12, 15, np.uint16), pack_gap=[0.3, 0.8]) == [3] * 4  # pauses drawn at 0.3 s: 29.14 s
    assert plan(nine, pack_gap=[0.3, 0.5], speed_perturb=0.05) == [2] * 6  # 3 x 9.5 / 0.95 = 30 s of clips alone
    assert plan([5, 31, 5, 5], pack_gap=[0.3, 0.5]) == [1, 1, 2]  # a clip past 30 s is a window of its own
    # random durations and pauses: every window fits 30 s as placed; strictly consecutive, it is full
    # (the next clip would not fit); looking 16 clips ahead, fuller
    rng = np.random.default_rng(0)
    secs = rng.uniform(0.5, 14.0, 3000).astype(np.float32)
    pauses = rng.integers(15, 41, 3000).astype(np.uint16)
    tokens = np.full(3000, 10, np.int16)
    filled = {}
    for lookahead in (0, 16):
        limits = PackLimits.of(TrainSection(pack=True, speed_perturb=0.1, pack_lookahead=lookahead), prefix_tokens=3)
        order, starts, _ = plan_windows(secs, tokens, limits, pauses=pauses)
        assert sorted(order.tolist()) == list(range(3000))
        worst = np.ceil(secs.astype(np.float64) * limits.stretch * SR) + limits.margin
        ends = fill(order, starts, worst, pauses)
        assert (ends <= 30 * SR).all()
        if lookahead == 0:
            nxt, last = order[starts[1:-1]], order[starts[1:-1] - 1]
            grid = round(TIME_STEP * SR)
            after = ends[:-1] - worst[last] + (-(-worst[last] // grid) + pauses[last]) * grid
            assert (after + worst[nxt] > 30 * SR).all()
        filled[lookahead] = secs.sum() / len(starts[:-1])
    assert filled[16] > filled[0] + 1.5  # seconds of clips a window


def test_labels_fit_448_positions(root, tokenizer, tok):
    limits = PackLimits.of(TrainSection(pack=True, pack_lookahead=0), prefix_tokens=3)
    assert limits.tokens == MAX_POSITIONS - 3  # label = 3 + segments + <|eot|>; the decoder reads all but <|sot|>

    def plan(toks, limits=limits):
        order, starts, _ = plan_windows(np.ones(len(toks), np.float32), np.asarray(toks, np.int16), limits)
        return [[toks[i] for i in order[a:b]] for a, b in pairwise(starts)]

    assert plan([148, 148, 149] * 2) == [[148, 148, 149]] * 2  # 445 segment tokens: a 449-token label, 448 read
    assert plan([148, 148, 150] * 2) == [[148, 148], [150, 148], [148, 150]]  # 446 > 445: the next window
    ahead = PackLimits.of(TrainSection(pack=True, pack_lookahead=1), prefix_tokens=3)
    assert plan([148, 148, 150, 148, 150, 140], ahead) == [[148, 148, 148], [150, 150, 140]]  # passes over one
    # the built labels: as long as the plan counted, within 448, and full
    s = samples(root, "long", tokenizer, pack_single_fraction=0.0, pack_plain_fraction=0.0, pack_lookahead=0)
    costs = {f"train-{i}": c for i, c in enumerate(s.ds.tokens.tolist())}
    ids, lengths = [], []
    for i in range(len(s)):
        row = s[i]
        clips = row["id"].split("+")
        assert len(row["labels"]) == 3 + sum(costs[c] for c in clips) + 1 <= MAX_POSITIONS + 1
        ids.append(clips)
        lengths.append(len(row["labels"]))
    assert max(lengths) > 400 and max(len(c) for c in ids) >= 2
    first_epoch = ids[:s.ds.windows_of(0)]
    for clips, nxt in pairwise(first_epoch):  # full: the next window's first clip would not have fitted
        assert 3 + sum(costs[c] for c in clips) + costs[nxt[0]] + 1 > MAX_POSITIONS + 1
    assert sorted(sum(first_epoch, [])) == sorted(f"train-{i}" for i in range(8))


def test_window_kinds_are_their_shares():
    limits = PackLimits.of(TrainSection(pack=True, pack_single_fraction=0.2, pack_plain_fraction=0.3), prefix_tokens=3)
    n = 20_000
    kinds = limits.kinds(np.random.default_rng(1).random(n))
    _, starts, window_kinds = plan_windows(np.full(n, 5.0, np.float32), np.full(n, 10, np.int16), limits, kinds)
    assert abs((window_kinds == SINGLE).mean() - 0.2) < 0.02  # ~4 binomial sd over ~8,000 windows
    assert abs((window_kinds == PLAIN).mean() - 0.3) < 0.02
    size = np.diff(starts)
    assert (size[window_kinds == SINGLE] == 1).all() and (size[window_kinds != SINGLE] > 1).mean() > 0.95
    assert size[window_kinds == PLAIN].mean() == pytest.approx(size[window_kinds == STAMPED].mean(), rel=0.05)


def test_single_clip_windows_keep_the_prepared_label(root, tokenizer, tok):
    s = samples(root, "a", tokenizer, pack_single_fraction=0.5, pack_plain_fraction=0.0)
    rows = [s[i] for i in range(len(s))]
    single = [tok.no_timestamps in r["labels"] for r in rows]
    assert 0 < sum(single) < len(rows)
    prepared = {f"train-{i}": tokenizer(a_text(i)).input_ids for i in range(40)}
    for r, one in zip(rows, single, strict=True):
        if one:  # the prepared row as it was: what clip eval decodes
            assert r["clips"] == 1 and r["labels"] == prepared[r["id"]] and not stamps(tok, r["labels"])
        else:
            assert len(stamps(tok, r["labels"])) == 2 * r["clips"]


def test_plain_windows_are_packed_and_labelled_without_timestamps(root, tokenizer, tok):
    s = samples(root, "a", tokenizer, pack_single_fraction=0.0, pack_plain_fraction=0.5)
    rows = [s[i] for i in range(len(s))]
    plain = [r for r in rows if tok.no_timestamps in r["labels"]]
    assert 0 < len(plain) < len(rows)
    texts = {f"train-{i}": a_text(i) for i in range(40)}
    for r in plain:  # prefix, <|notimestamps|>, the clips' texts joined by spaces, as the tokenizer writes them
        joined = " ".join(texts[c] for c in r["id"].split("+"))
        assert r["labels"] == tokenizer(joined).input_ids and not stamps(tok, r["labels"])
    stamped = [r for r in rows if tok.no_timestamps not in r["labels"]]
    assert all(len(stamps(tok, r["labels"])) == 2 * r["clips"] for r in stamped)
    assert np.mean([r["clips"] for r in plain]) > 2 and np.mean([r["audio_seconds"] for r in plain]) > 10


# ---------------------------------------------------------------- the labels


def test_labels_are_one_timestamped_segment_per_clip_where_the_clip_is(root, tokenizer, tok):
    s = samples(root, "a", tokenizer, pack_single_fraction=0.0, pack_plain_fraction=0.0)
    texts = {f"train-{i}": a_text(i) for i in range(40)}
    several = 0
    for i in range(len(s)):
        row = s[i]
        labels, audio, clips = row["labels"], row["audio"], row["id"].split("+")
        assert labels[:3] == tokenizer("x").input_ids[:3] and labels[-1] == tok.eot  # <|sot|> <|hi|> <|transcribe|>
        assert row["clips"] == len(clips) and row["audio_seconds"] == len(audio) / SR <= 30
        segs = segments_of(labels, tok)
        assert len(segs) == len(clips)  # one segment per clip, in the window's order
        times = stamps(tok, labels)
        assert times == sorted(times) and len(set(times)) == len(times) and times[-1] <= 30  # strictly increasing
        assert tokenizer.decode(labels, skip_special_tokens=True) == "".join(texts[c] for c in clips)
        for (start, end, text), clip in zip(segs, clips, strict=True):
            assert tokenizer.decode(text) == texts[clip]
            seconds = SECONDS[int(clip.split("-")[1]) % 5]
            first, n = round(start * SR), round(seconds * SR)
            assert first % round(TIME_STEP * SR) == 0  # on the grid: the clip starts exactly at its <|start|>
            assert not audio[max(first - 160, 0):first].any() and audio[first + 1] != 0  # silence, then the tone
            assert first + n <= len(audio) and not audio[first + n:first + n + 160].any()  # and silence after it
            assert abs(end - start - seconds) <= TIME_STEP / 2 + 1e-9  # <|end|>: its length, on the grid
        several += len(clips) > 1
    assert several >= len(s) - 1


def test_manifest_segments_are_kept_and_shifted_by_the_clips_offset(root, tokenizer, tok):
    s = samples(root, "seg", tokenizer, pack_single_fraction=0.0, pack_plain_fraction=0.0)
    shifted = 0
    for i in range(len(s)):
        row = s[i]
        segs, clips = segments_of(row["labels"], tok), row["id"].split("+")
        assert len(segs) == sum(2 if int(c.split("-")[1]) % 2 == 0 else 1 for c in clips)
        k = 0
        for clip in clips:
            if int(clip.split("-")[1]) % 2 == 0:  # its manifest's segments, 0-1.2 s and 1.5-2.8 s
                (s1, e1, t1), (s2, e2, t2) = segs[k:k + 2]
                assert [round(x - s1, 2) for x in (s1, e1, s2, e2)] == [0.0, 1.2, 1.5, 2.8]
                assert [tokenizer.decode(t1), tokenizer.decode(t2)] == ["एक", "दो"]
                first = round(s1 * SR)  # the clip's offset: where its audio starts in the window
                assert row["audio"][first + 1] != 0 and not row["audio"][max(first - 160, 0):first].any()
                shifted += s1 > 0
                k += 2
            else:
                k += 1
    assert shifted  # some were not at the window's start


# ---------------------------------------------------------------- corpora, options, the collator


def cfg(run, data, **extra) -> TrainConfig:
    base = {"run": run, "data": data, "model.base": "unused", "train.pack": "true", "train.batch_size": 2,
            "train.shuffle_buffer": 8, "train.epochs": 1}
    base.update(extra)
    return load_config(TrainConfig, None, [f"{k}={v}" for k, v in base.items()])


def test_corpora_are_packed_apart_and_steps_count_windows(root, tokenizer, tok, caplog):
    from lib.train import trainer as T

    caplog.set_level("INFO", logger="whisper_ft")
    corpora = T.open_data(Env(data_dir=root), parse_data("a:0.5,en:0.5"))
    flags = {"train.pack_single_fraction": 0, "train.pack_plain_fraction": 0}
    ds, _, steps = T.training_splits(cfg("mix", "a:0.5,en:0.5", **flags), corpora, tokenizer)
    per = {m.group(1): (int(m.group(2)), int(m.group(3)))
           for m in re.finditer(r"data: (\w+): (\d+) clips -> (\d+) windows", caplog.text)}
    assert per.keys() == {"a", "en"} and per["a"][0] == 40 and per["en"][0] == 12
    windows_total = per["a"][1] + per["en"][1]
    assert f"data: 52 clips -> {windows_total} windows (mean" in caplog.text
    assert steps == math.ceil(windows_total / 2)  # one epoch of windows at 2 a step, not of 52 clips
    en = tokenizer.convert_tokens_to_ids("<|en|>")
    hi = tokenizer.convert_tokens_to_ids("<|hi|>")
    words = {"a": set(WORDS), "en": set(EN_WORDS)}
    seen = set()
    for k in range(len(ds)):
        row = ds[k]
        seen.add(row["corpus"])
        assert row["labels"][1] == (en if row["corpus"] == "en" else hi)
        texts = [tokenizer.decode(t).strip() for _, _, t in segments_of(row["labels"], tok)]
        assert len(texts) == row["clips"] and set(texts) <= words[row["corpus"]]  # one corpus, one language
    assert seen == {"a", "en"}


def test_no_speech_prompts_and_audio_options_work_on_windows(root, tokenizer, tok):
    from lib.train import trainer as T

    flags = {"train.no_speech_fraction": 0.25, "train.prompt_probability": 1.0, "train.speed_perturb": 0.2,
             "train.gain_db": 6, "train.noise_snr_db": 10, "train.max_steps": 500, "train.pack_single_fraction": 0,
             "train.pack_plain_fraction": 0}
    ds, _, steps = T.training_splits(cfg("opts", "a", **flags), T.open_data(Env(data_dir=root), parse_data("a")), tokenizer)
    assert len(ds) == steps * 2 == 1000
    assert sum(ds.mix.locate(k)[0] for k in range(1000)) == 250  # a quarter of the windows are no speech
    rows = [ds[k] for k in range(24)]
    silent = [r for r in rows if r["clips"] == 0]
    speech = [r for r in rows if r["clips"]]
    assert silent and all(r["labels"] == [tok.sot, tok.no_speech, tok.eot] for r in silent)
    assert any(len(r["prompt"]) for r in speech)  # a window's first clip's previous text, same speaker
    for r in speech:
        assert len(r["audio"]) <= 30 * SR and len(r["prompt"]) + len(r["labels"]) <= MAX_POSITIONS
        segs = segments_of(r["labels"], tok)
        if len(segs) > 1:  # noise covers the pause too (without it a pause is zeros): the window is noisy
            pause = r["audio"][round(segs[0][1] * SR) + 80:round(segs[1][0] * SR) - 80]
            assert len(pause) and np.std(pause) > 0
    batch = WhisperCollator(WhisperFeatureExtractor(feature_size=80), tok.sot, start_of_prev=tok.start_of_prev)(rows[:4])
    assert set(batch) <= {"input_features", "labels", "decoder_input_ids"}  # clips, audio_seconds stay out


def test_workers_get_the_plan_not_per_clip_lists(root, tok):
    s = packed(root, "a", tok)
    w = s.windows_of(0)
    copy = pickle.loads(pickle.dumps(s))  # what a spawned DataLoader worker receives
    assert [copy[k]["id"] for k in (0, w - 1, w + 1)] == [s[k]["id"] for k in (0, w - 1, w + 1)]
    big = [k for k, v in vars(copy).items() if isinstance(v, (list, dict)) and len(v) >= 40]
    assert not big and copy.seconds.dtype == np.float32 and copy.tokens.dtype == np.int16


@pytest.mark.parametrize("flags, match", [
    ({"pack_gap": [0.01, 0.5]}, "train.pack_gap="), ({"pack_gap": [0.9, 0.5]}, "train.pack_gap="),
    ({"pack_gap": [0.3]}, "train.pack_gap="), ({"pack_single_fraction": 1.5}, "train.pack_single_fraction="),
    ({"pack_plain_fraction": -0.1}, "train.pack_plain_fraction="), ({"pack_lookahead": -1}, "train.pack_lookahead="),
    ({"pack_plain_fraction": 0.6, "pack_single_fraction": 0.5}, "at most 1 together"),
    ({"timestamp_probability": 0.5}, "train.timestamp_probability=0.5 with train.pack=true"),
])
def test_bad_pack_flags_name_the_flag(flags, match):
    with pytest.raises(UserError, match=re.escape(match)):
        TrainSection(pack=True, **flags)


def test_a_corpus_of_two_languages_is_refused(tmp_path, tiny_model_dir, tokenizer, tok):
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = write_prepared(tmp_path / "two", tiny_model_dir, {"train": [("नमस्ते", tone(1.0)), ("घर", tone(1.0))]})
    shard = next((out / "train").glob("*.parquet"))
    table = pq.read_table(shard)
    labels = table["labels"].to_pylist()
    labels[1][1] = tokenizer.convert_tokens_to_ids("<|en|>")
    col = table.schema.get_field_index("labels")
    pq.write_table(table.set_column(col, table.schema.field(col), pa.array(labels, table.schema.field(col).type)), shard)
    with pytest.raises(UserError, match="one language and task"):
        PackedStream.read(ShardStream(out, json.loads((out / "manifest.json").read_text()), name="two"), tok,
                          TrainSection(pack=True))


# ---------------------------------------------------------------- the train job: resume, DDP


def job_cfg(model_dir, run, **extra) -> TrainConfig:
    base = {
        "run": run, "data": "a", "model.base": str(model_dir), "model.quantization": "none",
        "model.precision": "auto", "model.gradient_checkpointing": "false", "lora.r": 4, "lora.alpha": 8,
        "train.batch_size": 2, "train.max_steps": 4, "train.eval_steps": 2, "train.save_steps": 2,
        "train.logging_steps": 1, "train.warmup_steps": 0, "train.num_workers": 0, "train.data_trace": "true",
        "train.shuffle_buffer": 8, "train.pack": "true",
    }
    base.update(extra)
    return load_config(TrainConfig, None, [f"{k}={v}" for k, v in base.items()])


def trace(run_dir: Path) -> list[tuple[int, str, str]]:
    lines = (run_dir / "data_order.tsv").read_text().splitlines()
    return [(int(p), c, i) for p, c, i in (line.split("\t") for line in lines)]


def test_a_packed_run_resumes_exactly(root, tiny_model_dir, tokenizer):
    """2 steps, then a rerun to 4 that resumes: the windows at every position are those of the
    stream an uninterrupted run reads in order (test_stream's resume test shows the Trainer does),
    and the resumed part skipped the consumed windows without reading them."""
    from lib.train import trainer as T

    env = Env(data_dir=root)
    ds, _, steps = T.training_splits(job_cfg(tiny_model_dir, "parts"), T.open_data(env, parse_data("a")), tokenizer)
    assert steps == 4 and len(ds) == 8  # 4 steps x 2 windows
    uninterrupted = [(k, ds[k]["corpus"], ds[k]["id"]) for k in range(8)]
    assert max(len(i.split("+")) for _, _, i in uninterrupted) > 2  # windows of several clips

    main(job_cfg(tiny_model_dir, "parts", **{"train.max_steps": 2}), env)
    first = trace(root / "runs" / "parts")
    main(job_cfg(tiny_model_dir, "parts"), env)  # resumes at step 2
    second = trace(root / "runs" / "parts")[len(first):]
    assert [p for p, _, _ in second] == list(range(4, 8))  # windows 0-3 skipped by index, not read
    assert first + second == uninterrupted  # the same windows of the same clips at the same positions


def test_two_ddp_ranks_read_every_clip_once_per_epoch(root, tiny_model_dir, tmp_path):
    env_file = tmp_path / "empty.env"
    env_file.write_text("")
    dist = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT",
            "TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT")
    env = {k: v for k, v in os.environ.items() if k not in dist}
    env.update(DATA_DIR=str(root), CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONUNBUFFERED="1")
    flags = {"run": "ddp", "data": "a", "model.base": tiny_model_dir, "model.quantization": "none",
             "model.precision": "fp32", "model.gradient_checkpointing": "false", "lora.r": 4, "lora.alpha": 8,
             "train.batch_size": 1, "train.epochs": 1, "train.eval_steps": 100, "train.save_steps": 100,
             "train.logging_steps": 1, "train.warmup_steps": 0, "train.num_workers": 0, "train.data_trace": "true",
             "train.shuffle_buffer": 8, "train.pack": "true", "train.seed": 5}
    logs = tmp_path / "logs"
    out = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--log-dir", str(logs),
         "--redirects", "3", "-m", "jobs.train", "--env-file", str(env_file), *[f"{k}={v}" for k, v in flags.items()]],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    rank = {r: "".join(p.read_text() for p in logs.glob(f"*/attempt_0/{r}/stderr.log")) for r in (0, 1)}
    assert out.returncode == 0, f"{out.stderr[-2000:]}\n{rank[0][-3000:]}\n{rank[1][-3000:]}"
    windows_0 = int(re.search(r"data: 40 clips -> (\d+) windows", rank[0]).group(1))
    assert all("2 windows per optimizer step" in rank[r] for r in (0, 1))
    read = trace(root / "runs" / "ddp")
    steps = math.ceil(windows_0 / 2)
    assert sorted(p for p, _, _ in read) == list(range(2 * steps))  # each window once, by one of the ranks
    first_epoch = sum((i.split("+") for p, _, i in read if p < windows_0), [])
    assert sorted(first_epoch) == sorted(f"train-{i}" for i in range(40))  # every clip once in the epoch


def test_batch_counts_are_clips_their_audio_and_label_tokens():
    from lib.train.collator import batch_counts

    rows = [{"audio": np.zeros(SR * 20), "labels": [1] * 50, "clips": 3, "clip_seconds": 17.5},  # a window
            {"audio": np.zeros(SR * 4), "labels": [1] * 12, "corpus": "a"},  # one clip, as prepared
            {"audio": np.zeros(SR * 8), "labels": [1, 2, 3], "corpus": "no-speech"}]  # no speech: no clip
    assert batch_counts(rows) == {"count_samples": 3, "count_clips": 4, "count_clip_seconds": 17.5 + 4 + 8,
                                  "count_label_tokens": 49 + 11 + 2}


def test_metrics_count_clips_label_tokens_and_audio_hours_beside_samples(root, tiny_model_dir):
    """A packed window is one sample of several clips: metrics.json says how many clips, label tokens
    and seconds of clip audio the timed steps learnt from, per second; unpacked, a sample is a clip."""
    env = Env(data_dir=root)
    rates = {}
    for pack in ("true", "false"):
        m = main(job_cfg(tiny_model_dir, f"count-{pack}", **{"train.pack": pack, "train.max_steps": 3,
                                                              "train.timing_warmup": 1, "train.data_trace": "false"}),
                 env)
        assert m["steady_steps"] == 2
        per_sample = m["steady_clips_per_second"] / m["steady_samples_per_second"]
        assert m["audio_hours_per_gpu_hour"] == pytest.approx(m["steady_audio_seconds_per_second"])
        assert m["steady_label_tokens_per_second"] > m["steady_samples_per_second"]
        rates[pack] = (per_sample, m["steady_audio_seconds_per_second"] / m["steady_samples_per_second"])
    assert rates["false"][0] == pytest.approx(1.0) and rates["true"][0] > 2  # several clips a window
    assert rates["true"][1] > 2 * rates["false"][1]  # more seconds of speech per sample, never the padding
