"""Issue 11, data side: prepare must not quietly train on wrong, duplicated or leaked rows."""

from __future__ import annotations

import numpy as np
import pytest

from jobs.prepare import PrepareConfig, main
from lib.config import load_config
from lib.dataset import shards
from lib.env import Env
from lib.errors import UserError
from tests.helpers import CV, split_ids, split_rows


def prepare(data_dir, model, *flags):
    cfg = load_config(PrepareConfig, None, [f"model={model}", "num_proc=1", *flags])
    return main(cfg, Env(data_dir=data_dir))


# ---------------------------------------------------------------- item 7: resume with another chunk_rows


@pytest.mark.parametrize("rerun_chunk_rows", [4, 10])
def test_resume_with_another_chunk_rows_neither_duplicates_nor_loses_rows(tiny_model_dir, tmp_path, monkeypatch,
                                                                            rerun_chunk_rows):
    from lib.prepare import workers as data_mod

    # train.tsv's 5 bad rows are its last; test.tsv's 4 good rows follow them: 21 rows.
    flags = ("source.kind=cv", f"source.path={CV}", "source.train=train+test", "source.validation=", "source.test=",
             "validation_fraction=0")
    whole = prepare(tmp_path / "ref", tiny_model_dir, "name=k", *flags)
    want = sorted(split_ids(tmp_path / "ref" / "prepared" / "k", "train"))
    real_row = data_mod.Processor.row
    calls = []

    def dies_in_third_chunk(self, *args):
        calls.append(1)
        if len(calls) == 13:
            raise KeyboardInterrupt("killed")
        return real_row(self, *args)

    monkeypatch.setattr(data_mod.Processor, "row", dies_in_third_chunk)
    with pytest.raises(KeyboardInterrupt):
        prepare(tmp_path / "data", tiny_model_dir, "name=k", *flags, "chunk_rows=6")  # 6 + 6 rows done
    monkeypatch.setattr(data_mod.Processor, "row", real_row)
    after = prepare(tmp_path / "data", tiny_model_dir, "name=k", *flags, f"chunk_rows={rerun_chunk_rows}")
    got = sorted(split_ids(tmp_path / "data" / "prepared" / "k", "train"))
    assert got == want and len(set(got)) == len(got)
    assert after["splits"]["train"]["rows"] == whole["splits"]["train"]["rows"]
    assert after["splits"]["train"]["rows_read"] == whole["splits"]["train"]["rows_read"] == 21
    assert after["skipped"] == whole["skipped"]


# ---------------------------------------------------------------- item 13: encodings


def test_latin1_tsv_and_csv_exit_2_naming_file_line_and_encoding(tiny_model_dir, tmp_path, capsys, monkeypatch):
    import shutil

    from lib.cli import run_job
    from tests.helpers import MANIFEST_DIR

    monkeypatch.setenv("DATA_DIR", str(tmp_path / "data"))
    src = tmp_path / "cv"
    shutil.copytree(CV, src)
    with open(src / "dev.tsv", "ab") as f:  # one Latin-1 row after four good ones (line 6)
        f.write("client9\tcommon_voice_hi_00001012.mp3\tx\tcaf\xe9 cr\xe8me\t2\t0\t\t\t\t\thi\t\n".encode("latin-1"))
    code = run_job("prepare", "", PrepareConfig, main,
                   [f"model={tiny_model_dir}", "num_proc=1", "source.kind=cv", f"source.path={src}", "name=l1"])
    err = capsys.readouterr().err
    assert code == 2
    assert f"{src / 'dev.tsv'} line 6: not UTF-8 (byte 0xe9" in err and "UnicodeDecodeError" not in err

    csv_file = tmp_path / "m" / "manifest.csv"
    shutil.copytree(MANIFEST_DIR / "clips", tmp_path / "m" / "clips")
    csv_file.write_bytes("audio,text\nclips/en_0.wav,fine\nclips/en_1.wav,na\xefve caf\xe9\n".encode("latin-1"))
    code = run_job("prepare", "", PrepareConfig, main,
                   [f"model={tiny_model_dir}", "num_proc=1", "language=en", "source.kind=manifest",
                    f"source.path={csv_file}", "name=l2"])
    err = capsys.readouterr().err
    assert code == 2 and f"{csv_file} line 3: not UTF-8 (byte 0xef at column 18)" in err


def test_utf8_bom_manifest_and_tsv_are_read(tiny_model_dir, tmp_path):
    import shutil

    from tests.helpers import MANIFEST_DIR

    shutil.copytree(MANIFEST_DIR / "clips", tmp_path / "m" / "clips")
    body = (MANIFEST_DIR / "manifest.csv").read_bytes()
    (tmp_path / "m" / "manifest.csv").write_bytes(b"\xef\xbb\xbf" + body)  # Excel's "CSV UTF-8"
    m = prepare(tmp_path / "data", tiny_model_dir, "name=bom", "language=en", "source.kind=manifest",
                f"source.path={tmp_path / 'm' / 'manifest.csv'}", "validation_fraction=0")
    assert m["splits"]["train"]["rows"] == 6 and m["splits"]["test"]["rows"] == 2
    src = tmp_path / "cv"
    shutil.copytree(CV, src)
    (src / "test.tsv").write_bytes(b"\xef\xbb\xbf" + (CV / "test.tsv").read_bytes())
    m = prepare(tmp_path / "data", tiny_model_dir, "name=bomcv", "source.kind=cv", f"source.path={src}",
                "source.train=", "source.validation=")
    assert m["splits"]["test"]["rows"] == 4


# ---------------------------------------------------------------- item 2 and 14: leaks and duplicates


def test_cv_train_plus_validated_drops_every_test_and_dev_clip_and_sentence(tiny_model_dir, tmp_path):
    import shutil

    src = tmp_path / "cv"
    shutil.copytree(CV, src)
    # Another speaker's clip of a test sentence, written without the danda: the same sentence
    # once normalized as the scores normalize it (test.tsv line 2: "फूल सुंदर हैं।").
    lines = (src / "train.tsv").read_text(encoding="utf-8").splitlines(keepends=True)
    lines[1] = lines[1].replace("नमस्ते, आप कैसे हैं?", "फूल  सुंदर हैं")
    (src / "train.tsv").write_text("".join(lines), encoding="utf-8")
    m = prepare(tmp_path / "data", tiny_model_dir, "name=v", "source.kind=cv", f"source.path={src}",
                "source.train=train+validated")
    out = tmp_path / "data" / "prepared" / "v"
    train_ids = set(split_ids(out, "train"))
    held_out = set(split_ids(out, "test")) | set(split_ids(out, "validation"))
    assert not train_ids & held_out
    assert "common_voice_hi_00001000.mp3" not in train_ids  # the sentence that is in test
    # validated.tsv = train (17) + dev (4) + test (4): the train lines are duplicates.
    # The edited clip is also on validated.tsv line 2 (with its old sentence): dropped there too.
    assert m["dropped_overlaps"] == {"train": {"in test": 6, "in validation": 4, "duplicate": 16}}
    reasons = {s["where"]: s["reason"] for s in m["skipped"] if s["split"] == "train"}
    assert reasons["train.tsv line 2"] == reasons["validated.tsv line 2"] == "in test: same sentence as test.tsv line 2"
    assert reasons["validated.tsv line 18"] == "in test: same clip as test.tsv line 2"
    assert reasons["validated.tsv line 14"] == "in validation: same clip as dev.tsv line 2"
    assert reasons["validated.tsv line 3"] == "duplicate: same clip as train.tsv line 3"
    # Counts still add up: kept + skipped = rows read (17 + 25 train rows).
    train = m["splits"]["train"]
    assert train["rows_read"] == 42 and train["rows"] + train["skipped"] == 42 and train["rows"] == 11
    assert m["skipped_by_reason"]["in test"] == 6


def test_manifest_same_clip_in_train_and_test_or_twice_is_dropped_and_counted(tiny_model_dir, tmp_path):
    import shutil

    from tests.helpers import MANIFEST_DIR

    shutil.copytree(MANIFEST_DIR / "clips", tmp_path / "m" / "clips")
    (tmp_path / "m" / "manifest.csv").write_text(
        "audio,text,split\n"
        "clips/en_0.wav,one,train\n"
        "clips/en_1.wav,two,train\n"
        "clips/./en_1.wav,two again,train\n"      # the same file, spelled another way
        "clips/en_2.wav,three,train\n"
        "clips/en_2.wav,three,test\n"             # a test clip also listed for train
        "clips/en_4.wav,Four!,validation\n"
        "clips/en_5.wav,four,train\n", encoding="utf-8")  # a validation sentence, once normalized
    m = prepare(tmp_path / "data", tiny_model_dir, "name=mm", "language=en", "source.kind=manifest",
                f"source.path={tmp_path / 'm' / 'manifest.csv'}")
    assert m["dropped_overlaps"] == {"train": {"duplicate": 1, "in test": 1, "in validation": 1}}
    assert {k: v["rows"] for k, v in m["splits"].items()} == {"train": 2, "validation": 1, "test": 1}
    ids = split_ids(tmp_path / "data" / "prepared" / "mm", "train")
    assert sorted(ids) == ["clips/en_0.wav", "clips/en_1.wav"]


# ---------------------------------------------------------------- item 14: paths that leave the corpus


@pytest.mark.parametrize("bad", ["../../../etc/passwd", "clips/../../outside.wav", "ABSOLUTE"])
def test_manifest_paths_outside_the_corpus_are_refused_unless_allowed(tiny_model_dir, tmp_path, bad):
    import shutil

    from lib.errors import UserError
    from tests.helpers import MANIFEST_DIR

    corpus = tmp_path / "corpus"
    shutil.copytree(MANIFEST_DIR / "clips", corpus / "clips")
    shutil.copy(MANIFEST_DIR / "clips" / "en_2.wav", tmp_path / "outside.wav")
    bad = str(tmp_path / "outside.wav") if bad == "ABSOLUTE" else bad
    mf = corpus / "manifest.csv"
    mf.write_text(f"audio,text\nclips/en_0.wav,fine\n{bad},escape\n", encoding="utf-8")
    flags = ("name=p", "language=en", "source.kind=manifest", f"source.path={mf}", "validation_fraction=0")
    with pytest.raises(UserError, match=r"manifest.csv line 3: audio path .* is outside the corpus folder .*"
                                        r"source.allow_outside_paths=true"):
        prepare(tmp_path / "data", tiny_model_dir, *flags)
    assert not (tmp_path / "data" / "prepared").exists()  # refused before any work
    if bad.endswith("outside.wav"):  # a real clip elsewhere, on purpose: the flag lets it in
        m = prepare(tmp_path / "data", tiny_model_dir, *flags, "source.allow_outside_paths=true")
        assert m["splits"]["train"]["rows"] == 2


def test_absolute_path_inside_the_corpus_and_cv_dotdot(tiny_model_dir, tmp_path):
    import shutil

    from lib.errors import UserError
    from tests.helpers import MANIFEST_DIR

    corpus = tmp_path / "corpus"
    shutil.copytree(MANIFEST_DIR / "clips", corpus / "clips")
    mf = corpus / "manifest.csv"
    mf.write_text(f"audio,text\n{corpus / 'clips' / 'en_0.wav'},fine\n", encoding="utf-8")
    m = prepare(tmp_path / "data", tiny_model_dir, "name=a", "language=en", "source.kind=manifest",
                f"source.path={mf}")
    assert m["splits"]["train"]["rows"] == 1
    src = tmp_path / "cv"
    shutil.copytree(CV, src)
    with open(src / "test.tsv", "a", encoding="utf-8") as f:
        f.write("client9\t../../secret.mp3\tx\tएक वाक्य।\t2\t0\t\t\t\t\thi\t\n")
    with pytest.raises(UserError, match=r"test.tsv line 6: audio path '../../secret.mp3' is outside"):
        prepare(tmp_path / "data", tiny_model_dir, "name=cvp", "source.kind=cv", f"source.path={src}")


# ---------------------------------------------------------------- item 14: impossible speaking rate


def _cut_mp3_without_length_header(clip, keep: float) -> bytes:
    """The first `keep` share of an mp3 whose Xing/Info frame (the length header) is defaced."""
    data = bytearray(clip.read_bytes())
    for tag in (b"Xing", b"Info"):
        at = data.find(tag, 0, 4096)
        if at >= 0:
            data[at:at + 4] = b"XXXX"
    return bytes(data[: int(len(data) * keep)])


def test_truncated_mp3_without_length_header_is_skipped_for_its_speaking_rate(tiny_model_dir, tmp_path):
    import shutil

    from lib.audio import decode

    src = tmp_path / "cv"
    shutil.copytree(CV, src)
    clip = src / "clips" / "common_voice_hi_00001001.mp3"  # train.tsv line 3, 2.21 s, 18 characters
    clip.write_bytes(_cut_mp3_without_length_header(clip, 0.3))
    seconds = len(decode(clip)) / 16_000  # decodes "fine": nothing in the file says it was cut
    assert seconds < 0.9
    m = prepare(tmp_path / "data", tiny_model_dir, "name=r", "source.kind=cv", f"source.path={src}")
    fast = [s for s in m["skipped"] if s["reason"].startswith("speech too fast")]
    assert [(s["split"], s["where"]) for s in fast] == [("train", "train.tsv line 3")]
    assert "the 'hi' median of 8." in fast[0]["reason"] and "max_rate_vs_median=2.5" in fast[0]["reason"]
    assert m["skipped_by_reason"]["speech too fast"] == 1
    assert "common_voice_hi_00001001.mp3" not in split_ids(tmp_path / "data" / "prepared" / "r", "train")
    # Off: the clip is kept (and every other clip of the fixture passes the check either way).
    m = prepare(tmp_path / "data", tiny_model_dir, "name=r0", "source.kind=cv", f"source.path={src}",
                "max_rate_vs_median=0")
    assert "speech too fast" not in m["skipped_by_reason"]
    assert m["splits"]["train"]["rows"] == 12


# ---------------------------------------------------------------- item 9: Hub audio without torchcodec


def _fake_hub(monkeypatch, tmp_path, builder: str, **kw):
    """Stand in for the Hub at datasets.load_dataset: the same call, answered by a local builder."""
    import datasets

    real_load = datasets.load_dataset
    calls = []

    def fake_load_dataset(path, name=None, *, split, token=None, revision=None, cache_dir=None):
        calls.append((path, name, split, revision))
        return real_load(builder, split=split, cache_dir=cache_dir, **kw)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    return calls


def test_hub_dataset_in_audiofolder_shape_needs_no_torchcodec(tiny_model_dir, tmp_path, monkeypatch):
    import csv
    import importlib.util
    import shutil

    from tests.helpers import MANIFEST_DIR

    assert importlib.util.find_spec("torchcodec") is None  # the lock has none: that is the point
    repo = tmp_path / "repo"
    for split, names in (("train", ["en_0", "en_1", "en_2"]), ("test", ["en_4", "en_5"])):
        (repo / split).mkdir(parents=True)
        with open(repo / split / "metadata.csv", "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["file_name", "transcription"])
            for n in names:
                shutil.copy(MANIFEST_DIR / "clips" / f"{n}.wav", repo / split / f"{n}.wav")
                w.writerow([f"{n}.wav", f"hub {n}"])
    calls = _fake_hub(monkeypatch, tmp_path, "audiofolder", data_dir=str(repo))
    m = prepare(tmp_path / "data", tiny_model_dir, "name=af", "language=en", "source.kind=hub",
                "source.hub_id=org/af", "source.validation=", "validation_fraction=0")
    assert [c[2] for c in calls] == ["train", "test"]
    assert {k: v["rows"] for k, v in m["splits"].items()} == {"train": 3, "test": 2}
    ds = split_rows(tmp_path / "data" / "prepared" / "af", "test")
    audio = shards.decode_audio(ds[0]["audio"], ds[0]["id"])
    assert ds[0]["text"] == "hub en_4" and abs(ds[0]["duration"] - len(audio) / 16_000) < 1e-3
    # Decoded by lib/audio.py: the same samples as decoding the file ourselves (the wav is
    # stored as FLAC: lossless for a 16-bit source).
    from lib.audio import decode

    want = decode(MANIFEST_DIR / "clips" / "en_4.wav")
    assert ds[0]["audio_format"] == "flac" and len(audio) == len(want)
    assert np.abs(audio - want).max() <= 1 / 32768


def test_shipped_hub_recipe_reads_a_parquet_fleurs_shaped_dataset(tiny_model_dir, tmp_path, monkeypatch):
    from datasets import Audio, Dataset, Features, Value

    from tests.helpers import MANIFEST_DIR, REPO

    recipe = REPO / "jobs" / "recipes" / "prepare_hub_fleurs_hi.yaml"
    cfg = load_config(PrepareConfig, recipe, [f"model={tiny_model_dir}", "num_proc=1"])
    assert cfg.source.hub_revision == "refs/convert/parquet"  # a revision datasets 5 can load
    files = {}
    for split, names in (("train", ["hi_0", "en_0"]), ("validation", ["en_1"]), ("test", ["hi_1"])):
        n = len(names)
        ext = {"hi_0": "mp3", "hi_1": "mp3"}
        ds = Dataset.from_dict(
            {"id": list(range(n)), "num_samples": [0] * n, "path": [f"{x}.{ext.get(x, 'wav')}" for x in names],
             "audio": [{"bytes": (MANIFEST_DIR / "clips" / f"{x}.{ext.get(x, 'wav')}").read_bytes(), "path": None}
                       for x in names],
             "transcription": [f"lower {x}" for x in names], "raw_transcription": [f"Raw {x}।" for x in names],
             "gender": [0] * n, "lang_id": [0] * n, "language": ["Hindi"] * n, "lang_group_id": [0] * n},
            features=Features({"id": Value("int32"), "num_samples": Value("int32"), "path": Value("string"),
                               "audio": {"bytes": Value("binary"), "path": Value("string")},
                               "transcription": Value("string"), "raw_transcription": Value("string"),
                               "gender": Value("int64"), "lang_id": Value("int64"), "language": Value("string"),
                               "lang_group_id": Value("int64")}))
        ds = ds.cast_column("audio", Audio(sampling_rate=16_000))  # as the Hub's parquet export types it
        files[split] = str(tmp_path / f"{split}.parquet")
        ds.to_parquet(files[split])
    calls = _fake_hub(monkeypatch, tmp_path, "parquet", data_files=files)
    m = main(cfg, Env(data_dir=tmp_path / "data"))
    assert {c[:2] for c in calls} == {(cfg.source.hub_id, cfg.source.hub_config)}
    assert {k: v["rows"] for k, v in m["splits"].items()} == {"train": 2, "validation": 1, "test": 1}
    row = split_rows(tmp_path / "data" / "prepared" / cfg.dataset(), "test")[0]
    assert row["text"] == "Raw hi_1।" and row["language"] == "hi"


def test_train_made_only_of_test_clips_is_dropped_whole_without_a_crash(tiny_model_dir, tmp_path):
    m = prepare(tmp_path / "data", tiny_model_dir, "name=e", "source.kind=cv", f"source.path={CV}",
                "source.train=test", "source.validation=")
    assert list(m["splits"]) == ["test"] and m["dropped_overlaps"] == {"train": {"in test": 4}}
    assert sum(s["split"] == "train" for s in m["skipped"]) == 4


# ---- item 3: data tokenized for one Whisper must not train another -----------------------------


def test_manifest_stores_the_tokenizer_signature_and_train_refuses_another(tiny_model_dir, tmp_path):
    """prepare stores the label prefix and the special-token ids; train and eval refuse a base
    whose tokenizer gives those ids other meanings, and say to prepare again with model=."""
    from transformers import WhisperTokenizer

    from lib.dataset.prepared import check_tokenizer, tokenizer_signature

    data = tmp_path / "data"
    m = prepare(data, tiny_model_dir, "name=sig", "language=hi", "source.kind=cv", f"source.path={CV}")
    sig = m["tokenizer_signature"]
    tok = WhisperTokenizer.from_pretrained(tiny_model_dir)
    assert sig["prefix"] == tok.convert_tokens_to_ids(
        ["<|startoftranscript|>", "<|hi|>", "<|transcribe|>", "<|notimestamps|>"])
    assert sig["special_ids"]["<|transcribe|>"] == 50359 and sig["vocab_size"] == len(tok)
    check_tokenizer(m, tok, "sig", str(tiny_model_dir), "model.base")  # the same tokenizer passes

    other = WhisperTokenizer.from_pretrained(tiny_model_dir)
    other.add_special_tokens({"additional_special_tokens": ["<|extra|>"]})  # vocabulary grows
    shifted = dict(m, tokenizer_signature=dict(sig, special_ids={**sig["special_ids"], "<|transcribe|>": 50360}))
    for manifest, t in ((m, other), (shifted, tok)):
        with pytest.raises(UserError, match=r"data=sig was tokenized with .* Prepare the data again with model=B"):
            check_tokenizer(manifest, t, "sig", "B", "model.base")
    assert tokenizer_signature(tok, "hi", "transcribe") == sig


def test_train_job_refuses_data_prepared_for_another_tokenizer(tiny_model_dir, tmp_path):
    import json

    from jobs.train import main
    from lib.config import load_config
    from lib.train.config import TrainConfig
    from tests.helpers import tone, write_prepared

    data = tmp_path / "data"
    out = write_prepared(data / "prepared" / "toy", tiny_model_dir, {"train": [("नमस्ते", tone(1.0))]})
    mf = json.loads((out / "manifest.json").read_text())
    mf["tokenizer_signature"]["special_ids"]["<|notimestamps|>"] = 50364  # v3's id for it
    (out / "manifest.json").write_text(json.dumps(mf))
    cfg = load_config(TrainConfig, None, ["run=r", "data=toy", f"model.base={tiny_model_dir}",
                                         "model.quantization=none", "model.precision=fp32"])
    with pytest.raises(UserError, match=r"<\|notimestamps\|> 50364 vs 50363.*Prepare the data again"):
        main(cfg, Env(data_dir=data))
    assert not (data / "runs" / "r" / "config.yaml").exists()


def test_a_long_recording_is_skipped_from_its_header_without_decoding(tiny_model_dir, tmp_path, monkeypatch):
    """A 2-hour WAV in a manifest of clips used to be read and decoded whole (1.56 GB peak) before
    being skipped as too long: its header says how long it is."""
    import soundfile as sf

    from lib.prepare import workers

    long_wav = tmp_path / "meeting.wav"
    sf.write(long_wav, np.zeros(8000 * 600, dtype=np.int16), 8000, subtype="PCM_16")  # 10 min at 8 kHz
    short_wav = tmp_path / "clip.wav"
    sf.write(short_wav, (0.1 * np.sin(np.arange(16000) / 5)).astype(np.float32), 16000)
    read = []
    real_read = workers.read_bytes
    monkeypatch.setattr(workers, "read_bytes", lambda path, name=None: (read.append(str(path)), real_read(path, name))[1])
    proc = workers.Processor(str(tiny_model_dir), "transcribe", workers.Limits(0.1, 30.0, 448), ["en"])
    clip, why = proc.row({"path": str(long_wav)}, "a long meeting", "en")
    assert clip is None and why.startswith("too long: 600.0 s > max_duration=30 s") and "header" in why
    clip, why = proc.row({"path": str(short_wav)}, "a short clip", "en")
    assert clip is not None and why == ""
    assert read == [str(short_wav)]  # the long file was never read, let alone decoded
