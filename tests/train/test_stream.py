"""Training data from shards (lib/train/stream.py, lib/dataset/prepared.py): streaming through fsspec URLs with a
bounded shuffle buffer, weighted mixing of corpora, resume that continues the data order, validation
WER per corpus, and old prepared folders refused."""

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from jobs.train import main
from lib.config import load_config
from lib.dataset.corpora import parse_data
from lib.dataset.prepared import load_split, open_prepared
from lib.env import Env
from lib.errors import UserError
from lib.train.config import TrainConfig
from lib.train.stream import MIX_BLOCK, Mixture, ShardStream, block_counts
from tests.helpers import tone, write_prepared

WORDS = ["नमस्ते", "धन्यवाद", "हाँ", "नहीं", "पानी", "घर", "जी", "आप"]


@pytest.fixture(scope="module")
def root(tmp_path_factory, tiny_model_dir):
    """DATA_DIR with prepared/a (40 train clips in shards of 6, speakers of 4 clips each, 4 validation)
    and prepared/b (12 train clips, 2 validation)."""
    d = tmp_path_factory.mktemp("data")
    a = [(WORDS[i % 8], tone(0.3, 200 + 7 * i)) for i in range(40)]
    write_prepared(d / "prepared" / "a", tiny_model_dir, {"train": a, "validation": a[:4]}, shard_rows=6,
                   speakers={"train": [f"s{i // 4}" for i in range(40)]})
    b = [(WORDS[i % 8], tone(0.3, 900 + 11 * i)) for i in range(12)]
    write_prepared(d / "prepared" / "b", tiny_model_dir, {"train": b, "validation": b[:2]}, shard_rows=5)
    return d


def stream(path, **kw) -> ShardStream:
    where, manifest = open_prepared(Env(data_dir=Path("/nonexistent")), str(path))
    return ShardStream(where, manifest, **kw)


def test_every_row_once_per_epoch_in_a_seeded_order_through_a_file_url(root):
    url = (root / "prepared" / "a").as_uri()  # file:///...: the fsspec path, as s3:// or gs:// would be
    s = stream(url, seed=3, shuffle_buffer=12, length=120)
    assert s.n == 40 and len(s.shards) == 7 and all(sh["url"].startswith("file://") for sh in s.shards)
    ids = [s[k]["id"] for k in range(120)]
    for e in range(3):
        assert sorted(ids[40 * e:40 * (e + 1)]) == sorted(f"train-{i}" for i in range(40))
    assert ids[:40] != ids[40:80] != ids[80:]  # each epoch has its own order
    assert ids[:40] != sorted(ids[:40], key=lambda x: int(x.split("-")[1]))  # shuffled
    again = stream(root / "prepared" / "a", seed=3, shuffle_buffer=12)
    assert [again[k]["id"] for k in range(119, -1, -1)] == ids[::-1]  # any order of reads, same rows
    assert [stream(url, seed=4, shuffle_buffer=12)[k]["id"] for k in range(40)] != ids[:40]


def test_memory_stays_within_the_shuffle_window(root):
    s = stream(root / "prepared" / "a", seed=0, shuffle_buffer=6, length=80)
    seen = []
    for k in range(80):
        shard, _ = s.locate(k)
        seen.append(shard)
        s[k]
        assert sum(len(t["id"]) for t in s._tables.values()) <= s._max_rows
    # a window of >= 6 rows is one shard here: the first 6 positions come from a single shard
    assert len(set(seen[:6])) == 1


def test_rows_decode_and_carry_the_previous_clip_of_the_same_speaker(root):
    s = stream(root / "prepared" / "a", seed=0, shuffle_buffer=1)  # buffer 1: shards in a seeded order, rows in order
    rows = [s[k] for k in range(40)]
    assert all(r["audio"].dtype == np.float32 and len(r["audio"]) == 4800 for r in rows)
    by_id = {r["id"]: r for r in rows}
    full = load_split(root / "prepared" / "a", "train")
    labels = {i: lab for i, lab in zip(full["id"], full["labels"], strict=True)}
    for i in range(40):
        r = by_id[f"train-{i}"]
        same_shard_and_speaker = i % 6 and (i - 1) // 4 == i // 4
        assert list(r["prev_labels"]) == (labels[f"train-{i - 1}"] if same_shard_and_speaker else [])


def test_memory_url_streams_too(root):
    import fsspec

    fs = fsspec.filesystem("memory")
    src = root / "prepared" / "b"
    for p in src.rglob("*"):
        if p.is_file():
            fs.pipe(f"/bucket/b/{p.relative_to(src)}", p.read_bytes())
    s = stream("memory://bucket/b", seed=1)
    assert sorted(s[k]["id"] for k in range(12)) == sorted(f"train-{i}" for i in range(12))
    assert len(load_split("memory://bucket/b", "validation")) == 2


def test_mixing_follows_the_weights_in_every_block(root):
    a, b = stream(root / "prepared" / "a", seed=0), stream(root / "prepared" / "b", seed=0)
    m = Mixture([("a", a), ("b", b)], [0.7, 0.3], seed=5, length=3 * MIX_BLOCK)
    where = [m.locate(k) for k in range(3 * MIX_BLOCK)]
    for blk in range(3):
        counts = Counter(j for j, _ in where[blk * MIX_BLOCK:(blk + 1) * MIX_BLOCK])
        assert counts == {0: 700, 1: 300}
    # each corpus is read in its own order, position after position, none skipped or repeated
    for j, n in ((0, 2100), (1, 900)):
        assert sorted(i for jj, i in where if jj == j) == list(range(n))
    # a random prefix is within binomial noise of the weights too
    share = sum(j == 1 for j, _ in where[:400]) / 400
    assert abs(share - 0.3) < 0.07
    row = m[1]
    assert row["corpus"] in ("a", "b") and row["position"] == 1
    assert block_counts([1, 1, 1]) == [334, 333, 333] and block_counts([1000, 1]) == [999, 1]


@pytest.mark.parametrize("text, want", [
    ("cv_hi", [("cv_hi", None)]),
    ("cv_hi:0.7,fleurs_hi:0.3", [("cv_hi", 0.7), ("fleurs_hi", 0.3)]),
    ("s3://bkt/prepared/cv:2,gs://b/f:1", [("s3://bkt/prepared/cv", 2.0), ("gs://b/f", 1.0)]),
    ("s3://bkt/prepared/cv", [("s3://bkt/prepared/cv", None)]),
])
def test_data_lists(text, want):
    assert [(c.name, c.weight) for c in parse_data(text)] == want


@pytest.mark.parametrize("text, match", [
    ("a:0.7,b", "every corpus a weight"), ("a:x", "not a weight"), ("a:0", "must be > 0"),
    ("a,a", "listed twice"), ("a,,b", "empty name"),
    ("a:inf,b:inf", "must be > 0 and finite"), ("a:nan,b:1", "must be > 0 and finite"), ("a:-1,b:1", "must be > 0"),
])
def test_bad_data_lists_name_the_problem(text, match):
    with pytest.raises(UserError, match=match):
        parse_data(text)


def test_an_old_prepared_folder_is_refused_with_the_command(tmp_path):
    old = tmp_path / "prepared" / "cv_hi"
    (old / "train").mkdir(parents=True)
    (old / "manifest.json").write_text(json.dumps({"name": "cv_hi", "splits": {"train": {"rows": 3}}}))
    with pytest.raises(UserError, match=r"older format.*make prepare DATA=cv_hi.*force=true"):
        open_prepared(Env(data_dir=tmp_path), "cv_hi")


def test_a_shard_changed_after_prepare_is_named(root, tmp_path):
    import shutil

    copy = tmp_path / "a"
    shutil.copytree(root / "prepared" / "a", copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    victim = copy / manifest["splits"]["train"]["shards"][2]["file"]
    victim.unlink()
    s = stream(copy, seed=0, shuffle_buffer=1000)
    with pytest.raises(UserError, match="is missing"):
        [s[k] for k in range(40)]


def train_cfg(model_dir, run, data, **extra) -> TrainConfig:
    base = {
        "run": run, "data": data, "model.base": str(model_dir), "model.quantization": "none",
        "model.precision": "auto", "model.gradient_checkpointing": "false", "lora.r": 4, "lora.alpha": 8,
        "train.batch_size": 2, "train.grad_accum": 2, "train.max_steps": 6, "train.eval_steps": 3,
        "train.save_steps": 3, "train.logging_steps": 1, "train.warmup_steps": 0, "train.generation_max_length": 4,
        "train.num_workers": 0, "train.data_trace": "true", "train.shuffle_buffer": 8,
    }
    base.update(extra)
    return load_config(TrainConfig, None, [f"{k}={v}" for k, v in base.items()])


def trace(run_dir: Path) -> list[tuple[int, str, str]]:
    lines = (run_dir / "data_order.tsv").read_text().splitlines()
    return [(int(p), c, i) for p, c, i in (line.split("\t") for line in lines)]


def test_resume_continues_the_data_order_without_reading_the_consumed_samples(root, tiny_model_dir):
    env = Env(data_dir=root)
    main(train_cfg(tiny_model_dir, "whole", "a", **{"train.max_steps": 6}), env)
    whole = trace(root / "runs" / "whole")
    assert [p for p, _, _ in whole] == list(range(24))  # 6 steps x batch 2 x grad_accum 2, in order

    main(train_cfg(tiny_model_dir, "parts", "a", **{"train.max_steps": 3}), env)
    assert (root / "runs" / "parts" / "checkpoints" / "checkpoint-3").is_dir()
    first = trace(root / "runs" / "parts")
    main(train_cfg(tiny_model_dir, "parts", "a", **{"train.max_steps": 6}), env)  # resumes at step 3
    second = trace(root / "runs" / "parts")[len(first):]
    assert [p for p, _, _ in second] == list(range(12, 24))  # positions 0-11 were skipped, not read
    assert first + second == whole  # the same clips at the same positions as the uninterrupted run


def test_two_corpora_by_weight_with_validation_wer_per_corpus(root, tiny_model_dir):
    env = Env(data_dir=root)
    url = (root / "prepared" / "b").as_uri()
    metrics = main(train_cfg(tiny_model_dir, "mix", f"a:0.5,{url}:0.5", **{"train.max_steps": 10}), env)
    rows = trace(root / "runs" / "mix")
    assert len(rows) == 40
    share = Counter(c for _, c, _ in rows)  # the URL's corpus is named by its last part: b
    assert abs(share["a"] - 20) <= 8 and share["a"] + share["b"] == 40  # 0.5 each, within binomial noise at n=40
    history = json.loads((root / "runs" / "mix" / "log_history.json").read_text())
    steps_a = [h["step"] for h in history if "eval_a_normalized_wer" in h]
    steps_b = [h["step"] for h in history if "eval_b_normalized_wer" in h]
    assert steps_a == steps_b == [3, 6, 9, 10]
    assert metrics["best_by"] == "eval_a_normalized_wer"
    assert set(metrics["per_corpus"]) == {"a", "b"}
    assert metrics["per_corpus"]["a"]["last_eval_normalized_wer"] is not None


def test_a_corpus_of_another_language_validates_in_its_own_language(root, tiny_model_dir, monkeypatch):
    """English clips mixed in against forgetting: their rows keep <|en|> labels, their validation
    decodes with language=en, the main corpus's with hi."""
    from transformers import WhisperForConditionalGeneration

    write_prepared(root / "prepared" / "en", tiny_model_dir,
                   {"train": [("hello", tone(0.3)), ("yes", tone(0.4))], "validation": [("hello", tone(0.3))]},
                   language="en")
    seen = []
    original = WhisperForConditionalGeneration.generate

    def spy(self, *args, **kwargs):
        seen.append(kwargs.get("language"))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(WhisperForConditionalGeneration, "generate", spy)
    metrics = main(train_cfg(tiny_model_dir, "mixlang", "a:0.8,en:0.2", **{"train.max_steps": 3}), Env(data_dir=root))
    assert set(metrics["per_corpus"]) == {"a", "en"}
    assert set(seen) == {"hi", "en"}  # a's validation in Hindi, en's in English
    labels = {c: i for _, c, i in trace(root / "runs" / "mixlang")}
    assert "en" in labels and "a" in labels


def test_eval_of_a_run_on_several_corpora_scores_each(root, tiny_model_dir):
    """make eval of a mixed run: the first corpus is the main dataset, the others are also= sets
    (WER and language ID each); a corpus without the split is skipped with a warning, not an error."""
    import jobs.eval as E

    for name, words in (("c", ["घर", "जी"]), ("d", ["पानी", "हाँ"])):
        write_prepared(root / "prepared" / name, tiny_model_dir,
                       {"train": [(w, tone(0.3 + 0.1 * i)) for i, w in enumerate(words)], "test": [(words[0], tone(0.3))]})
    write_prepared(root / "prepared" / "notest", tiny_model_dir, {"train": [("पानी", tone(0.3))]})
    env = Env(data_dir=root)
    main(train_cfg(tiny_model_dir, "mix3", "c:0.5,d:0.3,notest:0.2", **{"train.max_steps": 1}), env)
    cfg = load_config(E.EvalConfig, None, ["run=mix3", "limit=1", "longform.recordings=0", "no_speech_clips=0",
                                           "compare_base=false", "max_new_tokens=4"])
    report = E.main(cfg, env)
    assert report["data"].endswith("/prepared/c")
    assert set(report["also"]) == {"d"}  # notest has no test split: skipped with a warning
