"""Issue 12, prepare side: format-2 shards of encoded audio, their size on disk, resume, sharded
prepare (a Kubernetes Indexed Job's indexes as processes), kill -9, held-out validation, Hub cache."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from jobs.prepare import PrepareConfig, main
from lib.config import load_config
from lib.dataset import shards
from lib.dataset.prepared import read_manifest
from lib.env import Env
from lib.errors import UserError
from lib.prepare import staging
from tests.helpers import CV, REPO, split_rows

SR = 16_000


def prepare(data_dir: Path, model: Path, *flags: str, env: Env | None = None) -> dict:
    cfg = load_config(PrepareConfig, None, [f"model={model}", "num_proc=1", *flags])
    return main(cfg, env or Env(data_dir=data_dir))


def clip(seconds: float, freq: float, seed: int) -> np.ndarray:
    """A tone with a little noise: compresses like audio, not like silence."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SR)) / SR
    return (0.3 * np.sin(2 * np.pi * freq * t) + 0.01 * rng.standard_normal(t.size)).astype(np.float32)


def make_corpus(root: Path, n: int, fmt: str = "wav", fast: tuple[int, ...] = (), test_rows: int = 4,
                speakers: int = 0, shared_sentence: bool = False) -> Path:
    """n clips (1.0-1.5 s) listed in root/manifest.csv; rows in `fast` are 0.3 s with a long
    transcript (the speaking-rate check drops them); the last test_rows rows are the test split.
    mp3 at 48 kHz is what Common Voice ships; wav is 16 kHz 16-bit PCM."""
    (root / "clips").mkdir(parents=True)
    with open(root / "manifest.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["audio", "text", "split", "speaker"])
        for i in range(n):
            name = f"clips/c{i:04d}.{fmt}"
            fast_row = i in fast
            audio = clip(0.3 if fast_row else 1.0 + 0.5 * (i % 3) / 2, 200 + 7 * i, i)
            if fmt == "mp3":
                sf.write(root / name, np.interp(np.arange(len(audio) * 3) / 3, np.arange(len(audio)), audio), 48_000,
                         format="MP3")
            else:
                sf.write(root / name, audio, SR, subtype="PCM_16")
            text = (" ".join(f"word{i}" for _ in range(12)) if fast_row else f"sentence number {i}")
            speaker = f"spk{i % speakers}" if speakers else ""
            if shared_sentence and speakers and i < speakers:
                text = "the one sentence every speaker read"
            w.writerow([name, text, "test" if i >= n - test_rows else "train", speaker])
    return root / "manifest.csv"


def all_rows(out: Path) -> dict[str, list[tuple]]:
    """Every split's rows as comparable tuples, in shard order."""
    m = read_manifest(out)
    return {split: [(r["id"], r["text"], tuple(r["labels"]), r["audio"], round(r["duration"], 4), r["speaker"])
                    for r in split_rows(out, split)] for split in m["splits"]}


def tree(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


# ---------------------------------------------------------------- what a shard holds


def test_wav_is_stored_as_flac_mp3_as_given_and_both_decode_back(tiny_model_dir, tmp_path):
    from lib.audio import decode

    root = tmp_path / "corpus"
    (root / "clips").mkdir(parents=True)
    tone = clip(1.2, 330, 0)
    sf.write(root / "clips/pcm16.wav", 3 * tone, SR, subtype="PCM_16")  # near full scale
    # A float wav at 22.05 kHz: decoded to 16 kHz, then stored as 16-bit FLAC.
    t = np.arange(int(1.1 * 22_050)) / 22_050
    sf.write(root / "clips/float.wav", (0.9 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), 22_050,
             subtype="FLOAT")
    sf.write(root / "clips/tone.mp3", np.interp(np.arange(len(tone) * 3) / 3, np.arange(len(tone)), tone), 48_000,
             format="MP3")
    (root / "m.csv").write_text("audio,text\nclips/pcm16.wav,one\nclips/float.wav,two\nclips/tone.mp3,three\n")
    m = prepare(tmp_path / "data", tiny_model_dir, "name=f", "language=en", "source.kind=manifest",
                f"source.path={root / 'm.csv'}", "validation_fraction=0")
    rows = {r["id"]: r for r in split_rows(tmp_path / "data" / "prepared" / "f", "train")}
    assert {i: r["audio_format"] for i, r in rows.items()} == {
        "clips/pcm16.wav": "flac", "clips/float.wav": "flac", "clips/tone.mp3": "mp3"}
    assert rows["clips/tone.mp3"]["audio"] == (root / "clips/tone.mp3").read_bytes()
    for name, r in rows.items():
        back = shards.decode_audio(r["audio"], name)
        want = decode(root / name)
        assert back.dtype == np.float32 and len(back) == len(want)
        # 16-bit FLAC: at most half a step of rounding (2^-16); a 16-bit source comes back exactly.
        assert np.abs(back - want).max() <= (0 if name.endswith("pcm16.wav") else 0.5 / 32768) + 1e-9, name
        assert abs(r["duration"] - len(want) / SR) < 1e-4
    assert m["storage"]["formats"] == {"flac": 2, "mp3": 1}


# ---------------------------------------------------------------- pcm_codec=opus (issue 12: 60 MB an hour)


def snr_db(want: np.ndarray, got: np.ndarray) -> float:
    return float(10 * np.log10(np.sum(want.astype(np.float64) ** 2) / np.sum((want - got).astype(np.float64) ** 2)))


def test_pcm_codec_opus_stores_wav_as_ogg_opus_that_decodes_to_16k_at_its_length(tiny_model_dir, tmp_path):
    from lib.audio import decode
    from lib.summary import prepare_summary

    root = tmp_path / "corpus"
    (root / "clips").mkdir(parents=True)
    tone = clip(1.2, 330, 0)
    sf.write(root / "clips/pcm16.wav", tone, SR, subtype="PCM_16")
    t = np.arange(int(1.1 * 22_050)) / 22_050  # a float wav at 22.05 kHz: resampled to 16 kHz first
    sf.write(root / "clips/float.wav", (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), 22_050,
             subtype="FLOAT")
    sf.write(root / "clips/tone.mp3", np.interp(np.arange(len(tone) * 3) / 3, np.arange(len(tone)), tone), 48_000,
             format="MP3")
    (root / "m.csv").write_text("audio,text\nclips/pcm16.wav,one\nclips/float.wav,two\nclips/tone.mp3,three\n")
    m = prepare(tmp_path / "data", tiny_model_dir, "name=o", "language=en", "source.kind=manifest",
                f"source.path={root / 'm.csv'}", "validation_fraction=0", "pcm_codec=opus")
    out = tmp_path / "data" / "prepared" / "o"
    rows = {r["id"]: r for r in split_rows(out, "train")}
    assert {i: r["audio_format"] for i, r in rows.items()} == {
        "clips/pcm16.wav": "ogg", "clips/float.wav": "ogg", "clips/tone.mp3": "mp3"}
    assert rows["clips/tone.mp3"]["audio"] == (root / "clips/tone.mp3").read_bytes()  # compressed: as given
    for name in ("clips/pcm16.wav", "clips/float.wav"):
        data = rows[name]["audio"]
        assert data[:4] == b"OggS" and b"OpusHead" in data[:64], name  # Opus, not Vorbis
        back, want = shards.decode_audio(data, name), decode(root / name)
        # libsndfile honours Opus's pre-skip and end granule: the same samples count, not 20 ms more.
        assert back.dtype == np.float32 and abs(len(back) - len(want)) <= SR // 100, (name, len(back), len(want))
        assert abs(rows[name]["duration"] - len(want) / SR) < 0.01
        n = min(len(back), len(want))
        assert snr_db(want[:n], back[:n]) > 15, name  # lossy, but the same waveform (not silence, not shifted)
        assert len(data) < 0.5 * len(shards.flac_bytes(want, SR)), name
    st = m["storage"]
    assert st["formats"] == {"ogg": 2, "mp3": 1}
    assert (st["pcm_codec"], st["opus_kbps"], st["pcm_storage"]) == ("opus", 32, "Ogg/Opus 32 kbit/s (lossy)")
    assert read_manifest(out)["config"]["pcm_codec"] == "opus"
    assert prepare_summary(out, m)["storage"].endswith("PCM sources as Ogg/Opus 32 kbit/s (lossy)")


def test_opus_bitrate_is_what_opus_kbps_asks():
    """libsndfile takes a compression level, not a bitrate: the level shards.opus_bytes derives
    must land on the asked bitrate (its log says which it set), and the bytes must follow it."""
    rng = np.random.default_rng(0)
    noise = (0.2 * rng.standard_normal(4 * SR)).astype(np.float32)  # no silence for VBR to save on
    sizes = {}
    for kbps in (6, 16, 32, 64, 256):
        data = shards.opus_bytes(noise, SR, kbps)
        sizes[kbps] = len(data) * 8 / 4 / 1000  # kbit/s over the 4 s
        assert shards.sniff_format(data) == "ogg" and len(shards.decode_audio(data, "n")) == len(noise)
    assert sizes[6] < sizes[16] < sizes[32] < sizes[64] < sizes[256]
    assert 0.8 * 32 < sizes[32] < 1.25 * 32, sizes  # Ogg's pages and the header add a little
    with pytest.raises(ValueError, match="kbps=5"):
        shards.opus_bytes(noise, SR, 5)


def test_opus_is_well_below_flac_and_the_60_mb_target_for_the_same_wav_clips(tiny_model_dir, tmp_path):
    manifest_csv = make_corpus(tmp_path / "corpus", 24)
    flags = ("language=en", "source.kind=manifest", f"source.path={manifest_csv}", "validation_fraction=0",
             "max_rate_vs_median=0")
    flac = prepare(tmp_path / "data", tiny_model_dir, "name=flac", *flags)["storage"]
    opus = prepare(tmp_path / "data", tiny_model_dir, "name=opus", "pcm_codec=opus", *flags)["storage"]
    low = prepare(tmp_path / "data", tiny_model_dir, "name=low", "pcm_codec=opus", "opus_kbps=16", *flags)["storage"]
    assert flac["formats"] == {"flac": 24} and opus["formats"] == low["formats"] == {"ogg": 24}
    assert flac["pcm_codec"] == "flac" and flac["opus_kbps"] is None
    # 1.0-1.5 s clips: Ogg's two header pages (~0.9 KB a clip) weigh more than in real 5-s speech.
    assert opus["bytes_per_audio_hour"] < 0.5 * flac["bytes_per_audio_hour"]
    assert opus["bytes_per_audio_hour"] < 60e6
    assert low["bytes_per_audio_hour"] < opus["bytes_per_audio_hour"]


def test_pcm_codec_and_opus_kbps_are_checked_naming_the_flag():
    for bad in ("5", "257", "0"):
        with pytest.raises(UserError, match=rf"opus_kbps={bad}: use 6..256"):
            load_config(PrepareConfig, None, ["pcm_codec=opus", f"opus_kbps={bad}", "source.path=x"])
    with pytest.raises(UserError, match="pcm_codec.*'mp3' is not one of flac, opus"):
        load_config(PrepareConfig, None, ["pcm_codec=mp3", "source.path=x"])
    assert load_config(PrepareConfig, None, ["source.path=x"]).pcm_codec == "flac"  # lossless unless asked


def test_changing_the_pcm_codec_changes_the_fingerprint_and_redoes_the_dataset(tiny_model_dir, tmp_path):
    manifest_csv = make_corpus(tmp_path / "corpus", 8)
    flags = ("name=c", "language=en", "source.kind=manifest", f"source.path={manifest_csv}", "validation_fraction=0",
             "max_rate_vs_median=0")
    out = tmp_path / "data" / "prepared" / "c"

    def formats() -> set[str]:
        return {r["audio_format"] for s in ("train", "test") for r in split_rows(out, s, ["audio_format"])}

    flac = prepare(tmp_path / "data", tiny_model_dir, *flags)
    # opus_kbps means nothing to flac: the same fingerprint, up to date, nothing redone.
    again = prepare(tmp_path / "data", tiny_model_dir, *flags, "opus_kbps=16")
    assert again["fingerprint"] == flac["fingerprint"] and again["created"] == flac["created"]
    opus = prepare(tmp_path / "data", tiny_model_dir, *flags, "pcm_codec=opus")
    assert opus["fingerprint"] != flac["fingerprint"] and formats() == {"ogg"}
    assert prepare(tmp_path / "data", tiny_model_dir, *flags, "pcm_codec=opus")["created"] == opus["created"]
    opus16 = prepare(tmp_path / "data", tiny_model_dir, *flags, "pcm_codec=opus", "opus_kbps=16")
    assert opus16["fingerprint"] not in (flac["fingerprint"], opus["fingerprint"]) and formats() == {"ogg"}
    back = prepare(tmp_path / "data", tiny_model_dir, *flags)
    assert back["fingerprint"] == flac["fingerprint"] and formats() == {"flac"}


def test_data_benchmark_prepares_the_pcm_corpus_with_each_codec_and_tables_both():
    from lib.tools import bench_data

    cfg = load_config(bench_data.BenchDataConfig, None, [])
    assert cfg.pcm_codecs == ["flac", "opus"]  # both by default: the table shows what opus saves
    with pytest.raises(UserError, match="pcm_codecs=flac,mp3"):
        load_config(bench_data.BenchDataConfig, None, ["pcm_codecs=flac,mp3"])

    def leg(codec: str | None, per_hour: float) -> dict:
        return {"source": "wav" if codec else "mp3", "clips": 200, "num_proc": 2, "wall_s": 1, "clips_per_s": 9.0,
                "clips_per_s_per_core": 4.5, "source_bytes_per_hour": 115.2e6, "final_bytes_per_hour": per_hour,
                "peak_bytes_per_hour": per_hour, "final_over_source": 0.5, "peak_over_final": 1.0,
                "peak_ram_bytes": 1e9, "pcm_codec": codec, "opus_kbps": 32 if codec == "opus" else None,
                "stored_as": {"flac": "16-bit FLAC (lossless)", "opus": "Ogg/Opus 32 kbit/s (lossy)"}.get(codec)}

    results = {"prepare": [leg(None, 33.8e6), leg("flac", 88.5e6), leg("opus", 14.9e6)],
               "loader": [{"source": "wav", "pcm_codec": c, "clips_in_corpus": 200, "workers": 1, "clips": 80,
                           "clips_per_s": r, "clips_per_s_per_worker": r, "peak_ram_bytes": 8e8}
                          for c, r in (("flac", 100.0), ("opus", 50.0))]}
    table = "\n".join(bench_data.render(results))
    assert "| 200 x 5 s wav -> flac | 9.0 (4.5) | 115.2 | 88.5 (0.5) |" in table
    assert "| 200 x 5 s wav -> opus 32 kbit/s | 9.0 (4.5) | 115.2 | 14.9 (0.5) |" in table
    assert "| 50.0 (1) | 800.0 |" in table
    targets = bench_data.check_targets(results)
    assert "MISSED: PCM source prepared to 88.5 MB per hour as 16-bit FLAC (lossless) (target <= 60)" in targets
    assert "ok: PCM source prepared to 14.9 MB per hour as Ogg/Opus 32 kbit/s (lossy) (target <= 60)" in targets


def test_compare_storage_measures_what_a_codec_changes_against_the_reference(tmp_path, capsys):
    """The quality check of docs/results.md: the same clips stored as FLAC and as Opus (lib.dataset.prepared.write_rows
    takes prepare's pcm_codec too), their SNR, log-mel difference and transcript equality."""
    from lib.dataset.prepared import write_manifest, write_rows
    from lib.tools import compare_storage

    clips = [clip(1.0 + 0.25 * i, 220 + 40 * i, i) for i in range(3)]
    for name, codec in (("ref", "flac"), ("opus", "opus")):
        out = tmp_path / "prepared" / name
        info = write_rows(out, "test", ({"id": f"clips/c{i}.wav", "audio": a, "text": "x", "labels": [1]}
                                        for i, a in enumerate(clips)), pcm_codec=codec, opus_kbps=16)
        write_manifest(out, {"format": shards.FORMAT, "name": name, "splits": {"test": info}})
        ev = tmp_path / "evals" / name
        ev.mkdir(parents=True)
        hyps = ["a", "b", "c"] if codec == "flac" else ["a", "b", "other"]
        (ev / "predictions.tsv").write_text("id\thypothesis\n" + "".join(f"clips/c{i}.wav\t{h}\n"
                                                                        for i, h in enumerate(hyps)))
        (ev / "report.json").write_text(json.dumps({"results": {"model": {"normalized_wer": 0.5,
                                                                          "normalized_cer": 0.25}}}))
    assert {r["audio_format"] for r in split_rows(tmp_path / "prepared" / "opus", "test")} == {"ogg"}
    cfg = load_config(compare_storage.CompareStorageConfig, None, ["reference=ref", "others=opus",
                                                                   f"evals={tmp_path / 'evals'}"])
    ref, opus = compare_storage.main(cfg, Env(data_dir=tmp_path))
    assert (ref["identical"], ref["snr_median"], ref["logmel_mean"]) == (3, float("inf"), 0.0)
    assert opus["identical"] == 2 and opus["length_diff_max"] == 0
    assert 8 < opus["snr_min"] < 60 and 0 < opus["logmel_mean"] < 0.2  # lossy: changed, but the same sound
    assert opus["mb_per_hour"] < 0.5 * ref["mb_per_hour"]
    assert "| opus |" in capsys.readouterr().out
    with pytest.raises(UserError, match="others="):
        load_config(compare_storage.CompareStorageConfig, None, ["reference=ref"])


@pytest.mark.parametrize("fmt", ["wav", "mp3"])
def test_peak_disk_stays_within_1_3x_of_the_final_size(tiny_model_dir, tmp_path, monkeypatch, fmt, capsys):
    """Every parquet write is watched (the moment when a shard's temporary file and, for a
    rewrite, its old version are both on disk): work and output folders together never hold
    more than 1.3x the finished dataset, the speaking-rate rewrites included."""
    import pyarrow.parquet as pq

    manifest_csv = make_corpus(tmp_path / "corpus", 48, fmt, fast=(5, 22))
    prepared = tmp_path / "data" / "prepared"
    seen = []
    real_write = pq.write_table

    def watched_write(*args, **kwargs):
        real_write(*args, **kwargs)
        seen.append(staging.folder_bytes(prepared, skip_hub_cache=False))

    monkeypatch.setattr(pq, "write_table", watched_write)
    m = prepare(tmp_path / "data", tiny_model_dir, "name=d", "language=en", "source.kind=manifest",
                f"source.path={manifest_csv}", "chunk_rows=4", "validation_fraction=0")
    final = staging.folder_bytes(prepared / "d")
    assert m["skipped_by_reason"] == {"speech too fast": 2}
    assert len(seen) == 12 + 2  # 11 train shards + 1 test shard, 2 rewritten without their fast clip
    assert max(seen) <= 1.3 * final, (max(seen), final)
    st = m["storage"]
    assert st["bytes"] == sum(sh["bytes"] for info in m["splits"].values() for sh in info["shards"])
    assert st["bytes"] <= final and st["peak_vs_final"] <= 1.3
    assert tree(prepared) == sorted(["d/manifest.json"] + [f"d/{sh['file']}" for info in m["splits"].values()
                                                           for sh in info["shards"]])
    hours = sum(info["seconds"] for info in m["splits"].values()) / 3600
    assert st["bytes_per_audio_hour"] == pytest.approx(st["bytes"] / hours, rel=1e-3)
    if fmt == "mp3":  # the source's bytes, at most 1.2x (Parquet adds labels, text and its footer)
        assert st["bytes_vs_source"] <= 1.2
    else:  # FLAC of 16-bit PCM, smaller than the PCM (115.2 MB an hour); how much depends on the audio
        assert st["bytes_per_audio_hour"] < 0.9 * 115.2e6
    with capsys.disabled():
        print(f"\n[{fmt}] {st['bytes_per_audio_hour'] / 1e6:.1f} MB per audio hour (source "
              f"{st['source_bytes_per_audio_hour'] / 1e6:.1f}), peak watched {max(seen) / final:.3f}x final, "
              f"manifest's peak {st['peak_vs_final']:.3f}x")


# ---------------------------------------------------------------- held-out validation


def test_held_out_validation_is_speaker_disjoint_deterministic_and_sentence_clean(tiny_model_dir, tmp_path):
    manifest_csv = make_corpus(tmp_path / "corpus", 44, speakers=8, shared_sentence=True)  # 40 train, 5 a speaker
    flags = ("name=v", "language=en", "source.kind=manifest", f"source.path={manifest_csv}",
             "validation_fraction=0.2", "max_rate_vs_median=0")
    m = prepare(tmp_path / "a", tiny_model_dir, *flags)
    out = tmp_path / "a" / "prepared" / "v"
    train, val = split_rows(out, "train"), split_rows(out, "validation")
    assert val and not {r["speaker"] for r in train} & {r["speaker"] for r in val}
    assert len({r["speaker"] for r in val}) == 1 and len(val) == 5  # one speaker fits 20 % x 40 = 8 rows
    assert m["validation"] == {"made": "held out of train", "fraction": 0.2, "by": "speaker (speaker)",
                               "rows": 5, "share": 0.125, "speakers": 1}
    # Every speaker read one shared sentence: the 7 train copies of the held-out speaker's are dropped.
    assert m["dropped_overlaps"] == {"train": {"in validation": 7}}
    assert len(train) == 40 - 5 - 7 and m["splits"]["train"]["rows_read"] == 35
    # The same corpus elsewhere: the same slice (a hash of the speaker id, not a random draw).
    again = prepare(tmp_path / "b", tiny_model_dir, *flags)
    assert [r["id"] for r in split_rows(tmp_path / "b" / "prepared" / "v", "validation")] == [r["id"] for r in val]
    assert again["validation"] == m["validation"]


def test_held_out_validation_by_client_id_or_row_id(tiny_model_dir, tmp_path):
    m = prepare(tmp_path / "data", tiny_model_dir, "name=cv", "source.kind=cv", f"source.path={CV}",
                "source.validation=", "source.test=", "validation_fraction=0.1")
    out = tmp_path / "data" / "prepared" / "cv"
    speakers = {s: {r["speaker"] for r in split_rows(out, s)} for s in ("train", "validation")}
    assert m["validation"]["by"] == "speaker (client_id)" and speakers["validation"]
    assert not speakers["train"] & speakers["validation"]
    manifest_csv = make_corpus(tmp_path / "corpus", 24)  # no speaker ids
    m = prepare(tmp_path / "data", tiny_model_dir, "name=rows", "language=en", "source.kind=manifest",
                f"source.path={manifest_csv}", "validation_fraction=0.1", "max_rate_vs_median=0")
    assert m["validation"]["by"] == "row id" and m["splits"]["validation"]["rows"] == 2  # 10 % of 20
    m = prepare(tmp_path / "data", tiny_model_dir, "name=none", "language=en", "source.kind=manifest",
                f"source.path={manifest_csv}", "validation_fraction=0")
    assert "validation" not in m["splits"] and m["validation"] == {"made": "none", "why": "validation_fraction=0"}


# ---------------------------------------------------------------- old folders, Hub cache


def test_a_folder_of_the_old_format_is_prepared_again(tiny_model_dir, tmp_path, caplog):
    flags = ("name=o", "source.kind=cv", f"source.path={CV}", "source.train=", "source.validation=")
    prepare(tmp_path / "data", tiny_model_dir, *flags)
    out = tmp_path / "data" / "prepared" / "o"
    # What an older prepare left: a datasets save_to_disk folder, a manifest without "format"
    # (the same fingerprint, so only the format says it is old).
    mf = json.loads((out / "manifest.json").read_text())
    del mf["format"]
    (out / "manifest.json").write_text(json.dumps(mf))
    (out / "test" / "data-00000-of-00001.arrow").write_bytes(b"float32 PCM")
    caplog.set_level("WARNING")
    m = prepare(tmp_path / "data", tiny_model_dir, *flags)
    assert "was prepared in an older format" in caplog.text and "prepared again" in caplog.text
    assert m["format"] == 2 and read_manifest(out)["format"] == 2
    assert not (out / "test" / "data-00000-of-00001.arrow").exists()


def test_hub_source_leaves_nothing_in_hf_home(tiny_model_dir, tmp_path, monkeypatch):
    import datasets
    import huggingface_hub

    from tests.helpers import hub_parquet as _hub_parquet

    files = _hub_parquet(tmp_path / "hub")
    hf_home = tmp_path / "hf-home"
    monkeypatch.setenv("HF_HOME", str(hf_home))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hf_home / "hub"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(hf_home / "datasets"))
    real_load = datasets.load_dataset
    seen = []

    def fake_load_dataset(path, name=None, *, split, token=None, revision=None, cache_dir=None):
        # The Hub, offline: hf_hub_download would store the repo's files in HF_HUB_CACHE (it
        # ignores cache_dir); then datasets builds its Arrow copy in cache_dir. (copy2 keeps the
        # files' times: datasets fingerprints local files by them, Hub files by their revision.)
        blobs = Path(huggingface_hub.constants.HF_HUB_CACHE) / "datasets--org--cv" / "blobs"
        blobs.mkdir(parents=True, exist_ok=True)
        local = {}
        for s, f in files.items():
            local[s] = str(blobs / Path(f).name)
            shutil.copy2(f, local[s])
        seen.append((str(blobs), cache_dir))
        return real_load("parquet", data_files=local, split=split, cache_dir=cache_dir)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    data = tmp_path / "data"
    m = prepare(data, tiny_model_dir, "name=h", "language=en", "source.kind=hub", "source.hub_id=org/cv",
                "validation_fraction=0")
    work = data / "prepared" / ".h.partial" / ".hub-cache-0"
    assert all(blobs.startswith(str(work)) and cache.startswith(str(work)) for blobs, cache in seen)
    assert not hf_home.exists() or tree(hf_home) == []
    assert sorted(p.name for p in (data / "prepared").iterdir()) == ["h"]
    assert m["storage"]["source_cache_bytes"] > 0 and m["splits"]["train"]["rows"] == 2
    assert huggingface_hub.constants.HF_HUB_CACHE == str(hf_home / "hub")  # put back after the load
    # Up to date on a rerun (the Hub is read again to know that): nothing left behind either.
    again = prepare(data, tiny_model_dir, "name=h", "language=en", "source.kind=hub", "source.hub_id=org/cv",
                    "validation_fraction=0")
    assert again["created"] == m["created"] and len(seen) == 6
    assert not hf_home.exists() or tree(hf_home) == []
    assert sorted(p.name for p in (data / "prepared").iterdir()) == ["h"]


# ---------------------------------------------------------------- several processes


def start(args: list[str], data: Path, logf: Path, index: int | None = None) -> subprocess.Popen:
    """`python -m jobs.prepare ARGS` as its own process (and process group), as a pod runs it."""
    env = {**os.environ, "DATA_DIR": str(data), "HF_HUB_OFFLINE": "1"}
    env.pop("JOB_COMPLETION_INDEX", None)
    if index is not None:
        env["JOB_COMPLETION_INDEX"] = str(index)
    with open(logf, "w") as f:
        return subprocess.Popen([sys.executable, "-m", "jobs.prepare", *args], cwd=REPO, env=env, stdout=f,
                                stderr=subprocess.STDOUT, start_new_session=True)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, tiny_model_dir):
    """120 mp3 clips and their one-process prepare, to compare sharded runs with."""
    root = tmp_path_factory.mktemp("corpus")
    manifest_csv = make_corpus(root / "c", 120, "mp3", fast=(7, 70), speakers=10)
    args = [f"model={tiny_model_dir}", "name=s", "language=en", "source.kind=manifest",
            f"source.path={manifest_csv}", "chunk_rows=3", "validation_fraction=0.1"]
    m = prepare(root / "ref", tiny_model_dir, *args[1:])
    return args, all_rows(root / "ref" / "prepared" / "s"), m


def test_indexed_job_two_indexes_write_the_manifest_once_both_are_done(corpus, tmp_path):
    args, want, ref = corpus
    data = tmp_path / "data"
    p1 = start([*args, "shard_count=2"], data, tmp_path / "i1.log", index=1)
    assert p1.wait(timeout=300) == 0, (tmp_path / "i1.log").read_text()[-3000:]
    log1 = (tmp_path / "i1.log").read_text()
    assert not (data / "prepared" / "s").exists()  # index 0 has not run: no manifest yet
    assert "the index that finishes last writes the manifest" in log1 and "prepare [index 1 of 2]" in log1
    p0 = start([*args, "shard_count=2"], data, tmp_path / "i0.log", index=0)
    assert p0.wait(timeout=300) == 0, (tmp_path / "i0.log").read_text()[-3000:]
    m = read_manifest(data / "prepared" / "s")
    assert m["prepared_by"]["shard_count"] == 2 and m["prepared_by"]["finished_by_index"] == 0
    assert all_rows(data / "prepared" / "s") == want
    for key in ("fingerprint", "splits", "skipped", "skipped_by_reason", "validation", "dropped_overlaps"):
        assert m[key] == ref[key], key
    assert sorted(p.name for p in (data / "prepared").iterdir()) == ["s"]


def test_kill_9_during_sharded_prepare_then_rerun(corpus, tmp_path):
    """Two indexes at once into one DATA_DIR; index 1 (2 workers) is SIGKILLed with its workers
    mid-way. Index 0 finishes and exits 0 without a manifest; rerunning index 1 redoes only
    its missing chunks and finishes the dataset: every row once, nothing half-written read."""
    args, want, ref = corpus
    data = tmp_path / "data"
    stage = data / "prepared" / ".s.partial"
    p0 = start([*args, "shard_count=2"], data, tmp_path / "i0.log", index=0)
    p1 = start([*args, "shard_count=2", "shard_index=1", "num_proc=2"], data, tmp_path / "i1.log")
    plan = staging.plan_chunks({s: info["rows_read"] for s, info in ref["splits"].items()}, 3)  # no split emptied
    deadline = time.monotonic() + 240
    ours = {c.sidecar for c in plan if c.index % 2 == 1}
    while time.monotonic() < deadline and p1.poll() is None:
        done = {str(p.relative_to(stage)) for p in stage.rglob(".shard-*.json")} if stage.exists() else set()
        if done & ours:
            os.killpg(p1.pid, signal.SIGKILL)  # the pod is gone: the job and its workers
            break
        time.sleep(0.02)
    assert p1.wait(timeout=60) == -signal.SIGKILL, (tmp_path / "i1.log").read_text()[-3000:]
    assert p0.wait(timeout=300) == 0, (tmp_path / "i0.log").read_text()[-3000:]
    assert not (data / "prepared" / "s").exists()
    # What a kill can leave besides: a temporary file, and a shard whose sidecar never came.
    train = stage / "train"
    last = max((c for c in plan if c.index % 2 == 1 and c.split == "train"), key=lambda c: c.index)
    (train / f".{Path(last.file).name}.tmp-99999").write_bytes(b"half a parquet file")
    (stage / last.sidecar).unlink(missing_ok=True)
    (stage / last.file).write_bytes(b"not a parquet file")
    p1 = start([*args, "shard_count=2", "shard_index=1"], data, tmp_path / "i1b.log")
    assert p1.wait(timeout=300) == 0, (tmp_path / "i1b.log").read_text()[-3000:]
    log = (tmp_path / "i1b.log").read_text()
    assert "already done" in log
    out = data / "prepared" / "s"
    got = all_rows(out)
    assert got == want
    ids = [r[0] for rows in got.values() for r in rows]
    assert len(ids) == len(set(ids))
    m = read_manifest(out)
    assert tree(out) == sorted(["manifest.json"] + [sh["file"] for info in m["splits"].values()
                                                    for sh in info["shards"]])
    assert sorted(p.name for p in (data / "prepared").iterdir()) == ["s"]


def test_a_finalizer_killed_mid_way_is_recovered_by_the_rerun(tiny_model_dir, tmp_path, monkeypatch, caplog):
    """Killed after the speaking-rate check rewrote one of two shards, with its lock left
    behind by a dead process: the rerun takes the lock over at once (same host, pid gone),
    recognises the rewritten shard and finishes with the same rows as an uninterrupted run."""
    from lib.prepare import workers as data_mod

    manifest_csv = make_corpus(tmp_path / "corpus", 24, fast=(2, 13))
    flags = ("name=z", "language=en", "source.kind=manifest", f"source.path={manifest_csv}", "chunk_rows=4",
             "validation_fraction=0")
    prepare(tmp_path / "ref", tiny_model_dir, *flags)
    want = all_rows(tmp_path / "ref" / "prepared" / "z")
    real_drop = data_mod.drop_rows
    calls = []

    def killed_after_one_rewrite(*a):
        calls.append(a)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")
        return real_drop(*a)

    monkeypatch.setattr(data_mod, "drop_rows", killed_after_one_rewrite)
    with pytest.raises(KeyboardInterrupt):
        prepare(tmp_path / "data", tiny_model_dir, *flags)
    monkeypatch.setattr(data_mod, "drop_rows", real_drop)
    dead = subprocess.Popen(["true"])
    dead.wait()
    lock = tmp_path / "data" / "prepared" / ".z.lock" / "LOCK"
    lock.parent.mkdir()
    import socket

    from lib.runlock import _pid_namespace

    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid, "pid_ns": _pid_namespace(),
                                "started": "earlier", "token": "dead", "beat": 3}))
    caplog.set_level("INFO")
    m = prepare(tmp_path / "data", tiny_model_dir, *flags)
    assert "taking over" in caplog.text and "chunks of <= 4 rows in the plan, 6 for this index: 6 already done" in (
        caplog.text)
    assert all_rows(tmp_path / "data" / "prepared" / "z") == want and m["skipped_by_reason"] == {"speech too fast": 2}
    assert sorted(p.name for p in (tmp_path / "data" / "prepared").iterdir()) == ["z"]


def test_shard_index_comes_from_job_completion_index_and_is_checked(tmp_path, monkeypatch):
    from lib.env import load_env
    from lib.errors import UserError

    cfg = load_config(PrepareConfig, None, ["shard_count=4", "source.path=x"])
    monkeypatch.setenv("JOB_COMPLETION_INDEX", "3")
    assert cfg.index(load_env(None)) == 3
    assert load_config(PrepareConfig, None, ["shard_count=4", "shard_index=1", "source.path=x"]).index(
        load_env(None)) == 1
    assert load_config(PrepareConfig, None, ["source.path=x"]).index(load_env(None)) == 0  # one shard: index 0
    monkeypatch.delenv("JOB_COMPLETION_INDEX")
    with pytest.raises(UserError, match=r"shard_count=4 needs shard_index=0..3 .*JOB_COMPLETION_INDEX"):
        cfg.index(load_env(None))
    monkeypatch.setenv("JOB_COMPLETION_INDEX", "4")
    with pytest.raises(UserError, match="JOB_COMPLETION_INDEX=4 is not below shard_count=4"):
        cfg.index(load_env(None))
    with pytest.raises(UserError, match="shard_index=4: must be 0..3"):
        load_config(PrepareConfig, None, ["shard_count=4", "shard_index=4", "source.path=x"])
    with pytest.raises(UserError, match="force=true with shard_count > 1"):
        load_config(PrepareConfig, None, ["shard_count=2", "force=true", "source.path=x"])
