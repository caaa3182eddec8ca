"""jobs/prepare on the committed clips: every source kind, every filter, every bad input, reuse.

Prepared splits are read here straight from their shards (lib.dataset.shards.read_shard, in the
manifest's order): what `make prepare` wrote, not what a loader makes of it."""

from __future__ import annotations

import csv
import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from jobs.prepare import PrepareConfig, main
from lib.cli import run_job
from lib.config import load_config
from lib.dataset import shards
from lib.dataset.prepared import read_manifest
from lib.env import Env
from lib.errors import UserError
from tests.helpers import CV, FIXTURES, MANIFEST_DIR, REPO, hub_parquet, split_rows

FIX = FIXTURES


def prepare(data_dir: Path, model: Path, *flags: str, env: Env | None = None) -> dict:
    cfg = load_config(PrepareConfig, None, [f"model={model}", "num_proc=1", *flags])
    return main(cfg, env or Env(data_dir=data_dir))



def tsv_rows(name: str) -> int:
    with open(CV / name, encoding="utf-8") as f:
        return sum(1 for _ in f) - 1


@pytest.fixture(scope="module")
def cv_prepared(tiny_model_dir, tmp_path_factory):
    data = tmp_path_factory.mktemp("data")
    manifest = prepare(data, tiny_model_dir, "data=cv_hi", "language=hi", "source.kind=cv", f"source.path={CV}",
                       "num_proc=2")
    return data / "prepared" / "cv_hi", manifest


def test_cv_release_counts_equal_tsv_rows_minus_reported_skips(cv_prepared):
    out, manifest = cv_prepared
    assert read_manifest(out) == json.loads(json.dumps(manifest, default=str))
    for split, tsv in (("train", "train.tsv"), ("validation", "dev.tsv"), ("test", "test.tsv")):
        skipped = [s for s in manifest["skipped"] if s["split"] == split]
        ds = split_rows(out, split, ["id"])
        assert len(ds) == manifest["splits"][split]["rows"] == tsv_rows(tsv) - len(skipped)
        assert manifest["splits"][split]["rows_read"] == tsv_rows(tsv)
    reasons = {s["where"]: s["reason"] for s in manifest["skipped"]}
    assert reasons["train.tsv line 14"].startswith("does not decode: ")
    assert reasons["train.tsv line 15"].startswith("truncated: ")
    assert reasons["train.tsv line 16"] == "empty transcript"
    assert reasons["train.tsv line 17"].startswith("missing: ") and "09000004.mp3" in reasons["train.tsv line 17"]
    assert reasons["train.tsv line 18"].startswith("too long: 40.0 s > max_duration=30")
    assert len(reasons) == 5
    assert manifest["source"]["kind"] == "cv" and manifest["language"] == "hi"
    assert manifest["config"]["source"]["path"] == str(CV)
    assert {"datasets", "transformers", "soundfile"} <= set(manifest["versions"])
    assert manifest["splits"]["train"]["hours"] > 0
    assert manifest["format"] == shards.FORMAT and manifest["validation"] == {"made": "source split"}


def test_cv_shards_keep_the_mp3_bytes_and_hold_prefixed_labels(cv_prepared, tiny_model_dir):
    from transformers import WhisperTokenizer

    out, manifest = cv_prepared
    (shard,) = manifest["splits"]["validation"]["shards"]
    table = shards.read_shard(str(out / shard["file"]))
    assert tuple(table.column_names) == shards.COLUMNS and table.schema == shards.schema()
    assert shard == {"file": "validation/shard-000000000-000000004.parquet", "rows": 4,
                     "seconds": shard["seconds"], "bytes": (out / shard["file"]).stat().st_size}
    ds = table.to_pylist()
    tok = WhisperTokenizer.from_pretrained(tiny_model_dir, language="hi", task="transcribe")
    with open(CV / "dev.tsv", encoding="utf-8") as f:
        dev = {r["path"]: r for r in csv.DictReader(f, delimiter="\t")}
    for row in ds:
        # The source's own mp3, byte for byte: no float32, no re-encoding.
        assert row["audio"] == (CV / "clips" / row["id"]).read_bytes() and row["audio_format"] == "mp3"
        assert row["speaker"] == dev[row["id"]]["client_id"] and row["where"].startswith("dev.tsv line ")
        row["audio"] = shards.decode_audio(row["audio"], row["id"])
        assert row["text"] == dev[row["id"]]["sentence"]
        assert row["labels"] == tok(row["text"]).input_ids
        assert tok.convert_ids_to_tokens(row["labels"][:4]) == [
            "<|startoftranscript|>", "<|hi|>", "<|transcribe|>", "<|notimestamps|>"]
        assert row["labels"][-1] == tok.eos_token_id
        seconds = sf.info(str(CV / "clips" / row["id"])).duration
        assert abs(len(row["audio"]) / 16_000 - seconds) < 0.01
        assert abs(row["duration"] - seconds) < 0.01
        assert row["language"] == "hi"
    assert sum(r["duration"] for r in ds) == pytest.approx(shard["seconds"], abs=1e-3)


def test_rerun_reuses_and_a_changed_input_redoes(tiny_model_dir, tmp_path):
    src = tmp_path / "cv"
    shutil.copytree(CV, src)
    data = tmp_path / "data"
    flags = ("data=x", "source.kind=cv", f"source.path={src}", "source.train=", "source.validation=")
    first = prepare(data, tiny_model_dir, *flags)
    mtime = (data / "prepared" / "x" / "manifest.json").stat().st_mtime_ns
    again = prepare(data, tiny_model_dir, *flags)
    assert again["fingerprint"] == first["fingerprint"] and again["created"] == first["created"]
    assert (data / "prepared" / "x" / "manifest.json").stat().st_mtime_ns == mtime
    # One test row dropped from the TSV: the inputs changed, so the work is redone.
    lines = (src / "test.tsv").read_text(encoding="utf-8").splitlines(keepends=True)
    (src / "test.tsv").write_text("".join(lines[:-1]), encoding="utf-8")
    changed = prepare(data, tiny_model_dir, *flags)
    assert changed["fingerprint"] != first["fingerprint"]
    assert changed["splits"]["test"]["rows"] == first["splits"]["test"]["rows"] - 1
    assert sorted(p.name for p in (data / "prepared").iterdir()) == ["x"]  # no staging folder, lock or copy
    assert sorted(str(p.relative_to(data / "prepared" / "x")) for p in (data / "prepared" / "x").rglob("*")) == [
        "manifest.json", "test", "test/shard-000000000-000000003.parquet"]


def test_killed_run_keeps_old_dataset_and_resumes_finished_shards(tiny_model_dir, tmp_path, monkeypatch):
    from lib.prepare import workers as data_mod

    data = tmp_path / "data"
    flags = ("data=k", "source.kind=cv", f"source.path={CV}", "source.validation=", "source.test=", "chunk_rows=6",
             "validation_fraction=0")
    before = prepare(data, tiny_model_dir, *flags, "source.train=dev")
    real_row = data_mod.Processor.row
    calls = []

    def dies_in_third_chunk(self, audio_ref, *rest):
        calls.append(audio_ref["path"])
        if len(calls) == 13:  # the first row of rows 12-16
            raise KeyboardInterrupt("killed")
        return real_row(self, audio_ref, *rest)

    monkeypatch.setattr(data_mod.Processor, "row", dies_in_third_chunk)
    with pytest.raises(KeyboardInterrupt):
        prepare(data, tiny_model_dir, *flags)  # train.tsv: 17 rows = chunks of 6, 6, 5
    # The old dataset is untouched and still the finished one; two shards are done, each with its sidecar.
    assert read_manifest(data / "prepared" / "k") == json.loads(json.dumps(before, default=str))
    stage = data / "prepared" / ".k.partial"
    assert sorted(p.name for p in (stage / "train").iterdir()) == [
        ".shard-000000000-000000006.json", ".shard-000000006-000000012.json",
        "shard-000000000-000000006.parquet", "shard-000000006-000000012.parquet"]
    calls.clear()
    after = prepare(data, tiny_model_dir, *flags)
    assert len(calls) == 5  # only the third chunk's rows were decoded again
    assert after["splits"]["train"]["rows"] == 12 and len(after["skipped"]) == 5
    assert [s["file"] for s in after["splits"]["train"]["shards"]] == [
        "train/shard-000000000-000000006.parquet", "train/shard-000000006-000000012.parquet"]  # rows 12-16: all bad
    assert not stage.exists()


def test_manifest_csv_and_jsonl_with_per_row_language(tiny_model_dir, tmp_path):
    from transformers import WhisperTokenizer

    data = tmp_path / "data"
    m = prepare(data, tiny_model_dir, "data=m", "language=en", "source.kind=manifest",
                f"source.path={MANIFEST_DIR / 'manifest.csv'}", "validation_fraction=0")
    assert m["splits"]["train"]["rows"] == 6 and m["splits"]["test"]["rows"] == 2
    assert [(s["where"], s["reason"].split(":")[0]) for s in m["skipped"]] == [("manifest.csv line 10", "truncated")]
    ds = split_rows(data / "prepared" / "m", "train", ["id", "labels", "language"])
    tok = WhisperTokenizer.from_pretrained(tiny_model_dir)
    langs = {r["id"]: (r["language"], tok.convert_ids_to_tokens(r["labels"][1])) for r in ds}
    assert langs["clips/hi_0.mp3"] == ("hi", "<|hi|>") and langs["clips/en_0.wav"] == ("en", "<|en|>")
    j = prepare(data, tiny_model_dir, "data=j", "language=english", "source.kind=manifest",
                f"source.path={MANIFEST_DIR / 'manifest.jsonl'}", "validation_fraction=0")
    assert j["language"] == "en" and list(j["splits"]) == ["train"]  # no split column: all train
    assert j["splits"]["train"]["rows"] == 8 and len(j["skipped"]) == 1


def test_data_names_the_dataset_and_name_is_its_deprecated_alias(tiny_model_dir, tmp_path, caplog):
    """data= is the dataset prepare writes, the one train's and eval's data= read; name= (its old
    name) still works with a warning and is the same dataset; a name= that contradicts data= is an error."""
    import logging

    data = tmp_path / "data"
    flags = ("language=english", "source.kind=manifest", f"source.path={MANIFEST_DIR / 'manifest.jsonl'}",
             "validation_fraction=0")
    m = prepare(data, tiny_model_dir, "data=j", *flags)
    assert m["name"] == "j" and read_manifest(data / "prepared" / "j")["fingerprint"] == m["fingerprint"]
    # manifest.json records the config as before data= existed: the dataset under `name`, the resolved language
    assert list(m["config"])[:3] == ["name", "language", "task"] and "data" not in m["config"]
    assert m["config"]["name"] == "j" and m["config"]["language"] == "en"
    with caplog.at_level(logging.WARNING, logger="whisper_ft"):
        again = prepare(data, tiny_model_dir, "name=j", *flags)
    assert again["fingerprint"] == m["fingerprint"] and again["created"] == m["created"]  # up to date: the same
    assert any("name=j is deprecated: write data=j" in r.getMessage() for r in caplog.records)
    with pytest.raises(UserError, match="data=k and name=j: name= is the old name of data="):
        load_config(PrepareConfig, None, ["data=k", "name=j", *flags])
    assert load_config(PrepareConfig, None, ["data=j", "name=j", *flags]).dataset() == "j"
    assert load_config(PrepareConfig, None, [*flags]).dataset() == "dataset"
    with pytest.raises(UserError, match="name='a/b': give a plain folder name"):
        load_config(PrepareConfig, None, ["name=a/b", *flags])


def test_audiofolder_layout_with_split_folders(tiny_model_dir, tmp_path):
    root = tmp_path / "af"
    for split, names in (("train", ["en_0", "en_1", "en_2"]), ("test", ["en_4"])):
        (root / split).mkdir(parents=True)
        with open(root / split / "metadata.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["file_name", "transcription"])
            for n in names:
                shutil.copy(MANIFEST_DIR / "clips" / f"{n}.wav", root / split / f"{n}.wav")
                w.writerow([f"{n}.wav", f"sentence {n}"])
    m = prepare(tmp_path / "data", tiny_model_dir, "data=af", "language=en", "source.kind=audiofolder",
                f"source.path={root}", "validation_fraction=0")
    assert {k: v["rows"] for k, v in m["splits"].items()} == {"train": 3, "test": 1}
    assert split_rows(tmp_path / "data" / "prepared" / "af", "test")[0]["text"] == "sentence en_4"


def test_duration_and_label_length_filters(tiny_model_dir, tmp_path):
    clips = MANIFEST_DIR / "clips"
    long_text = " ".join(["supercalifragilistic"] * 120)  # ~5 tokens a word: far over 448
    rows = [{"audio": str(clips / "en_0.wav"), "text": "fine"},          # 2.78 s
            {"audio": str(clips / "en_1.wav"), "text": "too short"},     # 1.30 s
            {"audio": str(clips / "en_2.wav"), "text": long_text}]       # 1.49 s
    mf = tmp_path / "rows.jsonl"
    mf.write_text("".join(json.dumps(r) + "\n" for r in rows))
    m = prepare(tmp_path / "data", tiny_model_dir, "data=f", "language=en", "source.kind=manifest",
                f"source.path={mf}", "min_duration=1.4", "source.allow_outside_paths=true",  # absolute clips
                "validation_fraction=0")
    reasons = [s["reason"] for s in m["skipped"]]
    assert reasons[0].startswith("too short: 1.295 s < min_duration=1.4")
    assert reasons[1].startswith("labels too long: ") and "> 448" in reasons[1]
    assert m["splits"]["train"]["rows"] == 1
    assert m["skipped_by_reason"] == {"too short": 1, "labels too long": 1}


def test_tsv_missing_column_is_fatal_and_names_tsv_and_column(tiny_model_dir, tmp_path, capsys):
    src = tmp_path / "cv"
    shutil.copytree(CV, src)
    lines = (src / "train.tsv").read_text(encoding="utf-8").splitlines()
    (src / "train.tsv").write_text("\n".join(line.replace("\tsentence\t", "\ttext\t") for line in lines[:1])
                                   + "\n" + "\n".join(lines[1:]) + "\n", encoding="utf-8")
    code = run_job("prepare", "", PrepareConfig, main,
                   [f"model={tiny_model_dir}", "source.kind=cv", f"source.path={src}", "data=bad"])
    err = capsys.readouterr().err
    assert code == 2
    assert f"{src / 'train.tsv'}: column 'sentence' missing" in err


def test_unknown_language_fails_before_any_work(tiny_model_dir, tmp_path):
    # The source folder does not exist: the language error must come first.
    with pytest.raises(UserError, match=r"language='xx' is not a language .* language=hi"):
        prepare(tmp_path / "data", tiny_model_dir, "language=xx", "source.kind=cv", "source.path=/nonexistent")
    assert not (tmp_path / "data").exists()


def test_config_errors_name_the_flag(tiny_model_dir):
    with pytest.raises(UserError, match=r"source.kind=hub needs source.hub_id="):
        load_config(PrepareConfig, None, ["source.kind=hub"])
    with pytest.raises(UserError, match="max_duration"):
        load_config(PrepareConfig, None, ["max_duration=40", "source.path=x"])
    with pytest.raises(UserError, match="unknown key 'lang'"):
        load_config(PrepareConfig, None, ["lang=hi"])


# ---------------------------------------------------------------- Hub, faked at the network boundary



def test_hub_source_split_expressions_and_token(tiny_model_dir, tmp_path, monkeypatch):
    import datasets

    files = hub_parquet(tmp_path / "hub")
    real_load = datasets.load_dataset
    calls = []

    def fake_load_dataset(path, name=None, *, split, token=None, revision=None, cache_dir=None):
        # Stands in for the Hub: the same call, answered from local parquet files.
        calls.append((path, name, split, token))
        return real_load("parquet", data_files=files, split=split, cache_dir=cache_dir)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    env = Env(data_dir=tmp_path / "data", hf_token="hf_secret")
    m = prepare(tmp_path / "data", tiny_model_dir, "data=h", "language=en", "source.kind=hub",
                "source.hub_id=org/cv", "source.hub_config=en", "source.train=train+validation",
                "source.validation=", "validation_fraction=0", env=env)
    assert [c[2] for c in calls] == ["train+validation", "test"]
    assert all(c[:2] == ("org/cv", "en") and c[3] == "hf_secret" for c in calls)
    assert {k: v["rows"] for k, v in m["splits"].items()} == {"train": 3, "test": 2}
    ds = split_rows(tmp_path / "data" / "prepared" / "h", "train")
    assert ds[2]["text"] == "hub en_2" and ds[2]["id"] == "train+validation/2"
    assert "hf_secret" not in json.dumps(m)


def test_hub_gated_without_token_names_hf_token(tiny_model_dir, tmp_path, monkeypatch):
    import datasets
    from datasets.exceptions import DatasetNotFoundError

    def gated(*a, **k):
        raise DatasetNotFoundError("Dataset 'org/gated' is a gated dataset on the Hub. You must be authenticated to access it.")

    monkeypatch.setattr(datasets, "load_dataset", gated)
    with pytest.raises(UserError, match=r"org/gated is gated: set HF_TOKEN=.* env file"):
        prepare(tmp_path / "data", tiny_model_dir, "data=g", "source.kind=hub", "source.hub_id=org/gated")


# ---------------------------------------------------------------- MDC, faked at the HTTP boundary


class _Resp:
    def __init__(self, status: int, payload=None, body: bytes = b""):
        self.status_code, self._payload, self._body = status, payload, body
        self.text = json.dumps(payload) if payload is not None else ""

    def json(self):
        return self._payload

    def iter_content(self, chunk_size):
        for i in range(0, len(self._body), chunk_size):
            yield self._body[i : i + chunk_size]

    def raise_for_status(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def test_mdc_download_extract_and_prepare(tiny_model_dir, tmp_path, monkeypatch):
    import requests

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:  # the release layout: cv-corpus-X/hi/...
        for name in ("dev.tsv", "test.tsv", "train.tsv", "validated.tsv"):
            tf.add(CV / name, arcname=f"cv-corpus-test/hi/{name}")
        for clip in sorted((CV / "clips").glob("common_voice_hi_0000101*.mp3")):
            tf.add(clip, arcname=f"cv-corpus-test/hi/clips/{clip.name}")
    archive = buf.getvalue()
    seen = []

    def fake_request(method, url, headers=None, **kw):
        seen.append((method, url, (headers or {}).get("Authorization")))
        if url.endswith("/datasets/mdc-hi-1"):
            return _Resp(200, {"id": "mdc-hi-1", "filename": "cv-corpus-test-hi.tar.gz", "sizeBytes": len(archive)})
        if url.endswith("/datasets/mdc-hi-1/download"):
            return _Resp(200, {"downloadUrl": "https://files.example/presigned", "sizeBytes": len(archive),
                               "checksum": "abc"})
        if url == "https://files.example/presigned":
            return _Resp(200, body=archive)
        return _Resp(404, {"message": "no such thing"})

    monkeypatch.setattr(requests, "request", fake_request)
    monkeypatch.delenv("MDC_API_KEY", raising=False)
    with pytest.raises(UserError, match="MDC_API_KEY"):
        prepare(tmp_path / "data", tiny_model_dir, "data=mdc", "source.kind=mdc", "source.mdc_id=mdc-hi-1")
    env = Env(data_dir=tmp_path / "data", mdc_api_key="mdc_key")
    m = prepare(tmp_path / "data", tiny_model_dir, "data=mdc", "source.kind=mdc", "source.mdc_id=mdc-hi-1",
                "source.train=", env=env)
    assert (tmp_path / "data" / "downloads" / "mdc" / "cv-corpus-test-hi.tar.gz").is_file()
    assert ("POST", "https://mozilladatacollective.com/api/datasets/mdc-hi-1/download", "Bearer mdc_key") in seen
    # dev.tsv and test.tsv list clips 1012-1019; only 1010-1019 are in the archive.
    assert m["splits"]["validation"]["rows"] == 4 and m["splits"]["test"]["rows"] == 4
    assert m["source"]["kind"] == "mdc" and "mdc_key" not in json.dumps(m)
    assert Path(m["source"]["path"]).name == "hi"


# ---------------------------------------------------------------- recipes


def test_every_prepare_recipe_loads():
    recipes = sorted((REPO / "jobs" / "recipes").rglob("prepare_*.yaml"))
    assert recipes, "no jobs/recipes/prepare_*.yaml found"
    for r in recipes:
        cfg = load_config(PrepareConfig, r)
        assert cfg.source.kind in ("cv", "mdc", "hub", "manifest", "audiofolder")
        assert cfg.data and cfg.name is None and cfg.language  # recipes name the dataset with data=, not name=


def test_shards_hold_encoded_audio_that_decodes_to_float32_16k(cv_prepared):
    out, manifest = cv_prepared
    (row, *_) = split_rows(out, "test")
    assert isinstance(row["audio"], bytes) and row["audio_format"] == "mp3"
    audio = shards.decode_audio(row["audio"], row["id"])
    assert audio.dtype == np.float32 and abs(len(audio) / 16_000 - row["duration"]) < 1e-3
    # No float32 copy anywhere: the dataset is about the size of the source's mp3s.
    assert manifest["storage"]["bytes"] < 1.2 * manifest["storage"]["source_bytes"]
