"""Per-segment timestamps from a manifest's `segments` column: checked at prepare, written as the
shards' ts_labels (ids by name, v2 and v3-like tokenizers), used by TrainingSamples for
train.timestamp_probability (scaled with train.speed_perturb), and through the train job; folders
prepared before the column still load and train."""

import csv
import json
import logging
from pathlib import Path

import pytest
import soundfile as sf
from transformers import WhisperFeatureExtractor, WhisperTokenizer

from jobs.prepare import PrepareConfig
from jobs.prepare import main as prepare_main
from lib import whisper as W
from lib.config import load_config
from lib.dataset import shards
from lib.dataset.prepared import load_split, open_prepared, read_manifest
from lib.env import Env
from lib.errors import UserError
from lib.train import augment as A
from lib.train.collator import IGNORE_INDEX, WhisperCollator
from lib.train.config import TrainSection
from lib.train.stream import ShardStream
from tests.helpers import TOKENIZER_DIR, tone, v3_like_tokenizer_dir, write_prepared

SR = 16_000


def prepare(data_dir: Path, model: Path, *flags: str) -> dict:
    cfg = load_config(PrepareConfig, None, [f"model={model}", "num_proc=1", "validation_fraction=0", *flags])
    return prepare_main(cfg, Env(data_dir=data_dir))


def corpus(folder: Path, rows: list[dict], name: str = "m.csv") -> Path:
    """A CSV manifest beside 3-s (or `seconds`) tone clips: rows of {text, segments, split, seconds}."""
    (folder / "clips").mkdir(parents=True, exist_ok=True)
    with open(folder / name, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=["audio", "text", "split", "segments"])
        w.writeheader()
        for i, r in enumerate(rows):
            sf.write(folder / "clips" / f"c{i}.wav", tone(r.get("seconds", 3.0), 200 + 40 * i), SR)
            seg = r.get("segments", "")
            w.writerow({"audio": f"clips/c{i}.wav", "text": r["text"], "split": r.get("split", "train"),
                        "segments": seg if isinstance(seg, str) else json.dumps(seg, ensure_ascii=False)})
    return folder / name


def shard_rows(out: Path, split: str, columns=None) -> list[dict]:
    rows = []
    for s in read_manifest(out)["splits"][split]["shards"]:
        rows += shards.read_shard(str(out / s["file"]), columns).to_pylist()
    return rows


def strip_ts_labels(folder: Path) -> None:
    """Rewrite every shard of a prepared folder without ts_labels: a folder prepared before it existed."""
    import pyarrow.parquet as pq

    for f in folder.rglob("*.parquet"):
        table = pq.read_table(f)
        pq.write_table(table.drop_columns(["ts_labels"]), f)
        assert "ts_labels" not in pq.read_schema(f).names


# ---------------------------------------------------------------- prepare


@pytest.mark.parametrize("version", ["v2", "v3"])
def test_prepare_writes_the_segments_as_timestamped_label_ids(tiny_model_dir, tmp_path, version):
    model = tiny_model_dir if version == "v2" else v3_like_tokenizer_dir(tmp_path / "v3tok")  # a tokenizer folder
    src = corpus(tmp_path / "src", [
        {"text": "Hello there. General Kenobi!",
         "segments": [{"start": 0, "end": 1.234, "text": "Hello there."},
                      {"start": 1.234, "end": 2.96, "text": " General  Kenobi! "}]},
        {"text": "no segments here"},
        {"text": "वर्ष २०२४", "segments": [[0.5, 3.012, "वर्ष २०२४"]]},  # triple form; ends within 0.02 s of the clip
        {"text": "in test", "split": "test", "segments": [[0.1, 1.0, "in test"]]},
    ])
    m = prepare(tmp_path / "data", model, "name=s", "language=en", "source.kind=manifest", f"source.path={src}")
    assert (m["splits"]["train"]["segment_rows"], m["splits"]["train"]["segments"]) == (2, 3)
    assert m["splits"]["test"]["segment_rows"] == 1 and "ts_labels" in m["columns"]
    tok = WhisperTokenizer.from_pretrained(model, language="en", task="transcribe")

    def ids(*names):
        return tok.convert_tokens_to_ids(list(names))

    def text(s):  # what a segment's text becomes: canonical spelling, Whisper's leading space
        return tok.encode(s, add_special_tokens=False)

    head = ids("<|startoftranscript|>", "<|en|>", "<|transcribe|>")
    eot = ids("<|endoftext|>")
    rows = {r["id"]: r for r in shard_rows(tmp_path / "data" / "prepared" / "s", "train")}
    assert rows["clips/c0.wav"]["ts_labels"] == (head + ids("<|0.00|>") + text(" Hello there.") + ids("<|1.24|>")
                                                 + ids("<|1.24|>") + text(" General Kenobi!") + ids("<|2.96|>") + eot)
    assert rows["clips/c1.wav"]["ts_labels"] == []
    assert rows["clips/c2.wav"]["ts_labels"] == (head + ids("<|0.50|>") + text(" वर्ष 2024") + ids("<|3.02|>") + eot)
    # the prepared labels stay <|notimestamps|> ones: the other (1 - p) of samples use them
    assert rows["clips/c0.wav"]["labels"] == tok("Hello there. General Kenobi!").input_ids
    assert rows["clips/c0.wav"]["labels"][3] == ids("<|notimestamps|>")[0]
    # looked up by name: large-v3's <|yue|> moves <|0.00|> from 50364 to 50365
    assert rows["clips/c0.wav"]["ts_labels"][3] == (50364 if version == "v2" else 50365)
    again = prepare(tmp_path / "data", model, "name=s", "language=en", "source.kind=manifest", f"source.path={src}")
    assert again["created"] == m["created"]  # unchanged inputs: up to date


BAD = [
    ("[[0, 1.5, \"one\"], [1.2, 2.5, \"two\"]]", r"segment 2 \(1.2-2.5 s\) overlaps segment 1 \(0-1.5 s\)"),
    ("[[0, 3.5, \"past the end\"]]", r"segment 1 ends at 3.5 s, past the clip's end \(3.00 s\)"),
    ("[[0, 1, \"one\"],", r"not JSON \(Expecting value at character 16\)"),
    ("[[1, 2, \"b\"], [0, 0.5, \"a\"]]", r"segment 2 starts at 0 s, before segment 1 \(1 s\): list the segments"),
    ("[[1, 1, \"x\"]]", r"segment 1 runs from 1 s to 1 s: need 0 <= start < end"),
    ("[{\"start\": 0, \"end\": 1, \"text\": \" \"}]", r"segment 1 \(0-1 s\) has no text"),
    ("[[0, 31, \"x\"]]", r"segment 1 ends at 31 s, past 30 s"),
    ("[[\"0\", 1, \"x\"]]", r"segment 1: start and end must be numbers"),
    ("{\"start\": 0}", r"a JSON dict, not a list"),
]


@pytest.mark.parametrize("cell,match", BAD, ids=["overlap", "past-end", "not-json", "unsorted", "empty-span",
                                                 "no-text", "over-30-s", "not-numbers", "not-a-list"])
def test_a_bad_segments_cell_stops_prepare_naming_file_row_and_problem(tiny_model_dir, tmp_path, cell, match):
    src = corpus(tmp_path / "src", [{"text": "one two", "segments": cell}, {"text": "fine"}])
    with pytest.raises(UserError, match=r"^m\.csv line 2 \(clips/c0\.wav\): segments: " + match):
        prepare(tmp_path / "data", tiny_model_dir, "name=bad", "language=en", "source.kind=manifest",
                f"source.path={src}")
    assert not (tmp_path / "data" / "prepared" / "bad").exists()


def test_a_segment_past_the_clip_fails_from_a_worker_process_with_exit_2(tiny_model_dir, tmp_path, capsys,
                                                                         monkeypatch):
    """The clip's length is known only once a worker has decoded it: the error crosses the pool."""
    from lib.cli import run_job

    monkeypatch.setenv("DATA_DIR", str(tmp_path / "data"))
    src = corpus(tmp_path / "src", [{"text": "fine"}, {"text": "x", "segments": [[0, 2.5, "x"]], "seconds": 2.0}])
    code = run_job("prepare", "", PrepareConfig, prepare_main, [
        f"model={tiny_model_dir}", "name=bad", "language=en", "source.kind=manifest", f"source.path={src}",
        "num_proc=2", "chunk_rows=1", "validation_fraction=0"])
    assert code == 2
    assert "m.csv line 3 (clips/c1.wav): segments: segment 1 ends at 2.5 s, past the clip's end (2.00 s)" in (
        capsys.readouterr().err)


def test_segments_that_do_not_spell_the_text_are_warned_about(tmp_path, caplog):
    from lib.prepare.sources import SourceConfig, read_manifest_source

    src = corpus(tmp_path / "src", [{"text": "Hello, world", "segments": [[0, 1, "hello"], [1, 2, "WORLD!"]]},
                                    {"text": "something else", "segments": [[0, 1, "another clip"]]}])
    with caplog.at_level(logging.WARNING, logger="whisper_ft"):
        rows = read_manifest_source(src, SourceConfig(kind="manifest", path=str(src)), "en")
    assert json.loads(rows.splits["train"]["segments"][0]) == [[0.0, 1.0, "hello"], [1.0, 2.0, "WORLD!"]]
    (warning,) = [r.getMessage() for r in caplog.records if "segments' texts" in r.getMessage()]
    assert "1 rows" in warning and "first: m.csv line 3" in warning


# ---------------------------------------------------------------- TrainingSamples


@pytest.fixture(scope="module", params=["v2", "v3"])
def tokenizer(request, tmp_path_factory):
    where = TOKENIZER_DIR if request.param == "v2" else v3_like_tokenizer_dir(tmp_path_factory.mktemp("v3tok"))
    return WhisperTokenizer.from_pretrained(where, language="hi", task="transcribe")


def samples_split(tok, seconds: float = 4.0):
    """An in-memory train split: rows 0 and 2 with segments (ts_labels as prepare builds them), row 1 without."""
    from datasets import Dataset

    t = A.SpecialTokens.of(tok)
    texts = ["नमस्ते जी", "पानी", "हाँ धन्यवाद"]
    labels = [tok(x).input_ids for x in texts]

    def seg(x):
        return tok.encode(" " + x, add_special_tokens=False)

    ts = [W.segmented(labels[0], [(0.0, 1.5, seg("नमस्ते")), (1.6, 3.9, seg("जी"))], t), [],
          W.segmented(labels[2], [(0.3, 2.0, seg("हाँ धन्यवाद"))], t)]
    rows = {"audio": [tone(seconds, 300 + 50 * i) for i in range(3)], "labels": labels, "ts_labels": ts}
    return Dataset.from_dict(rows).with_format("numpy"), ts


def stamps(tok, labels) -> list[float]:
    t = A.SpecialTokens.of(tok)
    return [round((i - t.timestamp_begin) * W.TIME_STEP, 2) for i in labels if i >= t.timestamp_begin]


def test_timestamped_samples_use_the_segments_and_the_clip_span_elsewhere(tokenizer):
    ds, ts = samples_split(tokenizer)
    s = A.TrainingSamples(ds, tokenizer, TrainSection(timestamp_probability=1.0))
    assert s[0]["labels"] == ts[0] and s[2]["labels"] == ts[2]
    assert stamps(tokenizer, s[0]["labels"]) == [0.0, 1.5, 1.6, 3.9]
    assert s[1]["labels"] == A.timestamped(list(ds[1]["labels"]), 4.0, A.SpecialTokens.of(tokenizer))
    off = A.TrainingSamples(ds, tokenizer, TrainSection(timestamp_probability=0.0, prompt_probability=1.0))
    assert [off[i]["labels"] for i in range(3)] == [list(ds[i]["labels"]) for i in range(3)]  # <|notimestamps|>


def test_speed_perturbation_scales_every_segment_timestamp(tokenizer):
    ds, ts = samples_split(tokenizer)
    s = A.TrainingSamples(ds, tokenizer, TrainSection(timestamp_probability=1.0, speed_perturb=0.2, seed=3))
    changed = 0
    for i in (0, 2):
        row = s[i]
        factor = len(row["audio"]) / (4.0 * SR)  # 1 / speed: the audio's new length over its old one
        got, want = stamps(tokenizer, row["labels"]), stamps(tokenizer, ts[i])
        assert len(got) == len(want)
        assert all(abs(g - w * factor) <= 0.011 for g, w in zip(got, want, strict=True))  # on the 0.02-s grid
        # only the timestamps move: the text tokens between them are the prepared ones
        begin = A.SpecialTokens.of(tokenizer).timestamp_begin
        assert [x for x in row["labels"] if x < begin] == [x for x in ts[i] if x < begin]
        changed += got != want
    assert changed
    # the clip-duration row ends at the sped-up clip's duration, as before
    assert stamps(tokenizer, s[1]["labels"])[-1] == pytest.approx(round(len(s[1]["audio"]) / SR / 0.02) * 0.02)


def test_rescaled_caps_at_30_s_and_keeps_other_tokens(tokenizer):
    t = A.SpecialTokens.of(tokenizer)
    labels = [t.sot, 400, t.timestamp(10.0), 401, t.timestamp(29.5), t.eot]
    assert A.rescaled(labels, 0.9, t) == [t.sot, 400, t.timestamp(11.12), 401, t.timestamp(30.0), t.eot]
    assert A.rescaled(labels, 1.1, t)[2] == t.timestamp(9.10)


def test_segment_labels_past_448_positions_fall_back_to_the_prepared_ones(tokenizer):
    from datasets import Dataset

    t = A.SpecialTokens.of(tokenizer)
    labels = tokenizer("नमस्ते").input_ids
    long = W.segmented(labels, [(0.02 * k, 0.02 * k + 0.01, [400]) for k in range(150)], t)  # 3 tokens a segment
    assert len(long) - 1 > A.MAX_POSITIONS
    ds = Dataset.from_dict({"audio": [tone(3.0)], "labels": [labels], "ts_labels": [long]}).with_format("numpy")
    assert A.TrainingSamples(ds, tokenizer, TrainSection(timestamp_probability=1.0))[0]["labels"] == labels


def test_the_collator_strips_sot_and_pads_segment_labels(tokenizer):
    ds, ts = samples_split(tokenizer)
    t = A.SpecialTokens.of(tokenizer)
    s = A.TrainingSamples(ds, tokenizer, TrainSection(timestamp_probability=1.0))
    rows = [s[0], s[1]]
    batch = WhisperCollator(WhisperFeatureExtractor(feature_size=80), t.sot, start_of_prev=t.start_of_prev)(rows)
    labels = batch["labels"]
    assert labels.shape == (2, max(len(r["labels"]) for r in rows) - 1) and "decoder_input_ids" not in batch
    for k, r in enumerate(rows):
        n = len(r["labels"]) - 1
        assert labels[k, :n].tolist() == r["labels"][1:] and (labels[k, n:] == IGNORE_INDEX).all()
    assert labels[0, :3].tolist() == ts[0][1:4]  # <|hi|> <|transcribe|> <|0.00|>


# ---------------------------------------------------------------- old folders, streaming, the train job


def test_a_folder_prepared_before_ts_labels_still_loads_and_streams(tiny_model_dir, tmp_path):
    out = tmp_path / "prepared" / "old"
    write_prepared(out, tiny_model_dir, {"train": [("नमस्ते", tone(1.0)), ("पानी", tone(1.2, 300))],
                                         "validation": [("घर", tone(0.8, 500))]}, shard_rows=1)
    strip_ts_labels(out)
    assert shards.read_shard(str(next(out.rglob("*.parquet"))), ["id", "ts_labels"]).to_pydict()["ts_labels"] == [[]]
    full = load_split(out, "train")
    assert full.column_names == list(shards.COLUMNS) and full["ts_labels"] == [[], []]
    where, manifest = open_prepared(Env(data_dir=tmp_path), "old")
    rows = [ShardStream(where, manifest, "train")[k] for k in range(2)]
    assert [r["ts_labels"] for r in rows] == [[], []]


def train_flags(model_dir, run, data, **extra) -> list[str]:
    base = {"run": run, "data": data, "model.base": str(model_dir), "model.quantization": "none",
            "model.precision": "fp32", "model.gradient_checkpointing": "false", "lora.r": 2, "lora.alpha": 4,
            "train.batch_size": 2, "train.max_steps": 2, "train.eval_steps": 2, "train.save_steps": 2,
            "train.logging_steps": 1, "train.warmup_steps": 0, "train.generation_max_length": 4,
            "train.num_workers": 0, "train.timestamp_probability": 1.0}
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def test_the_train_job_trains_on_the_segments_of_a_prepared_manifest(tiny_model_dir, tmp_path, monkeypatch, caplog):
    from jobs.train import main as train_main
    from lib.train import collator as C
    from lib.train.config import TrainConfig

    src = corpus(tmp_path / "src", [
        {"text": "नमस्ते जी", "segments": [[0.0, 1.0, "नमस्ते"], [1.2, 2.5, "जी"]]},
        {"text": "पानी", "segments": [[0.4, 2.0, "पानी"]]},
        {"text": "घर", "split": "validation"},
    ])
    data = tmp_path / "data"
    prepare(data, tiny_model_dir, "name=seg", "language=hi", "source.kind=manifest", f"source.path={src}")
    ts = {r["id"]: r["ts_labels"] for r in shard_rows(data / "prepared" / "seg", "train")}
    seen = []
    real_call = C.WhisperCollator.__call__
    monkeypatch.setattr(C.WhisperCollator, "__call__", lambda self, rows: seen.append((rows, real_call(self, rows)))
                        or seen[-1][1])
    with caplog.at_level(logging.INFO, logger="whisper_ft"):
        metrics = train_main(load_config(TrainConfig, None, train_flags(tiny_model_dir, "seg", "seg")),
                             Env(data_dir=data))
    assert metrics["global_step"] == 2
    assert any("per segment on the 2 of 2 train clips whose manifest gave segments" in r.getMessage()
               for r in caplog.records)
    train = [(rows, out) for rows, out in seen if all("prompt" in r for r in rows)]
    assert train
    for rows, out in train:
        for k, r in enumerate(rows):
            assert list(map(int, r["labels"])) == ts[r["id"]]  # no speed change: the prepared ids as they are
            n = len(r["labels"]) - 1
            assert out["labels"][k, :n].tolist() == ts[r["id"]][1:] and (out["labels"][k, n:] == IGNORE_INDEX).all()


def test_the_train_job_trains_an_old_folder_with_the_clip_span(tiny_model_dir, tmp_path, monkeypatch):
    from jobs.train import main as train_main
    from lib.train import collator as C
    from lib.train.config import TrainConfig

    out = tmp_path / "prepared" / "old"
    write_prepared(out, tiny_model_dir, {"train": [("नमस्ते", tone(1.0)), ("पानी", tone(1.0, 300))],
                                         "validation": [("घर", tone(0.8, 500))]})
    strip_ts_labels(out)
    seen = []
    real_call = C.WhisperCollator.__call__
    monkeypatch.setattr(C.WhisperCollator, "__call__", lambda self, rows: seen.append(rows) or real_call(self, rows))
    metrics = train_main(load_config(TrainConfig, None, train_flags(tiny_model_dir, "old", "old")),
                         Env(data_dir=tmp_path))
    assert metrics["global_step"] == 2
    labels = [list(map(int, r["labels"])) for rows in seen for r in rows if "prompt" in r]
    t = A.SpecialTokens.of(WhisperTokenizer.from_pretrained(tiny_model_dir))
    assert labels and all(row[3] == t.timestamp(0.0) and row[-2] == t.timestamp(1.0) for row in labels)
