"""Long-form evaluation and the forgetting / language-ID check (issue 13 items 2 and 3):
joining, timestamp validity, LID accuracy and drop flags as units, then eval end to end."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest

from lib.errors import UserError
from lib.evaluate.forgetting import detect_languages, drop_flags, lid_accuracy
from lib.evaluate.longform import LongformConfig, join_plan, segment_problems, timestamp_validity
from tests.helpers import FIXTURES, tone, write_prepared

# ------------------------------------------------------------------ joining


def test_join_plan_is_consecutive_within_minutes_and_deterministic():
    durations = [9.0, 12.0, 7.5, 20.0, 4.0, 11.0, 13.0, 6.0, 25.0, 3.0] * 4
    plan = join_plan(durations, minutes=0.75, recordings=5, gap=0.5)
    assert plan == join_plan(list(durations), minutes=0.75, recordings=5, gap=0.5)
    assert len(plan) == 5
    flat = [i for rec in plan for i in rec]
    assert flat == list(range(len(flat)))  # consecutive clips, in split order, none twice
    for rec in plan:
        seconds = sum(durations[i] for i in rec) + 0.5 * (len(rec) - 1)
        assert seconds <= 45.0
        # closed only because the next clip would not fit
        assert seconds + 0.5 + durations[rec[-1] + 1] > 45.0


def test_join_plan_drops_the_short_tail_but_keeps_a_short_split():
    assert join_plan([20.0] * 7, minutes=1, recordings=10) == [[0, 1, 2], [3, 4, 5]]  # clip 6 alone: dropped
    assert join_plan([5.0, 6.0], minutes=1, recordings=3) == [[0, 1]]  # all there is
    assert join_plan([5.0, 6.0], minutes=1, recordings=0) == []
    assert join_plan([40.0, 10.0, 10.0], minutes=0.5, recordings=2) == [[1, 2]]  # a clip longer than one


def test_longform_config_names_the_flag():
    with pytest.raises(UserError, match="longform.minutes"):
        LongformConfig(minutes=10)
    with pytest.raises(UserError, match="longform.max_new_tokens must be 1..220"):
        LongformConfig(max_new_tokens=300)
    assert LongformConfig(condition_on_prev_tokens=False).window_budget() == 444
    assert LongformConfig().window_budget() == 220
    assert LongformConfig().window_budget(eval_max_new_tokens=300) == 220  # never past the positions
    assert LongformConfig().window_budget(eval_max_new_tokens=40) == 40
    assert LongformConfig(max_new_tokens=30).window_budget(eval_max_new_tokens=40) == 30


# ------------------------------------------------------------------ timestamp validity


def seg(start, end, text="word", timestamped=True):
    return {"start": start, "end": end, "text": text, "timestamped": timestamped}


def test_segment_problems_on_hand_made_segments():
    good = [seg(0.0, 4.2), seg(4.2, 9.0), seg(9.5, 29.8), seg(30.0, 41.0)]
    assert segment_problems(good, duration=41.2) == [[], [], [], []]
    bad = [seg(0.0, 5.0), seg(3.0, 6.0), seg(6.0, 6.0), seg(7.0, 8.0, text="  "), seg(8.0, 50.0),
           seg(50.0, 60.0, timestamped=False)]
    assert segment_problems(bad, duration=45.0) == [
        [], ["not increasing"], ["not increasing"], ["empty"], ["outside audio"],
        ["no timestamps", "outside audio"]]


def test_timestamp_validity_counts_segments_and_recordings():
    decoded = [[seg(0, 10), seg(10, 20)], [seg(0, 10), seg(5, 8)], []]
    out = timestamp_validity(decoded, [20.0, 20.0, 20.0])
    assert out["segments"] == 4 and out["valid_segments"] == 3 and out["valid_share"] == 0.75
    assert out["recordings_all_valid"] == 1  # a recording without any segment is not valid
    assert out["problems"] == {"not increasing": 1}


# ------------------------------------------------------------------ language ID and drops


def test_lid_accuracy_from_a_stub_of_the_detection_output():
    out = lid_accuracy(["en", "en", "hi", "ur"], ["en", "en", "en", "en"])
    assert out["lid_accuracy"] == 0.5 and out["lid_correct"] == 2
    assert out["detected"] == {"en": 2, "hi": 1, "ur": 1}
    with pytest.raises(ValueError):
        lid_accuracy(["en"], ["en", "hi"])


def test_detect_languages_reads_the_predicted_language_token(tiny_model_dir, monkeypatch):
    import torch
    from datasets import Dataset
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    model = WhisperForConditionalGeneration.from_pretrained(tiny_model_dir)
    processor = WhisperProcessor.from_pretrained(tiny_model_dir)
    ids = processor.tokenizer.convert_tokens_to_ids(["<|en|>", "<|hi|>", "<|en|>"])
    calls = []

    def stub(input_features):
        calls.append(input_features.shape)
        n = input_features.shape[0]
        out, ids[:n] = ids[:n], ids[n:]
        return torch.tensor(out)

    monkeypatch.setattr(model, "detect_language", stub)
    ds = Dataset.from_dict({"audio": [tone(0.5), tone(0.7), tone(0.3)]})
    assert detect_languages(model, processor, ds, batch_size=2) == ["en", "hi", "en"]
    assert [tuple(c) for c in calls] == [(2, 80, 3000), (1, 80, 3000)]


def test_drop_flags_fire_beyond_the_thresholds_only():
    base = {"lid_accuracy": 0.95, "normalized_wer": 0.20}
    assert drop_flags("en", {"adapter": {"lid_accuracy": 0.94, "normalized_wer": 0.24}, "base": base}, 0.02, 0.05) == []
    flags = drop_flags("en", {"adapter": {"lid_accuracy": 0.90, "normalized_wer": 0.30}, "base": base}, 0.02, 0.05)
    assert len(flags) == 2 and "forgetting_max_drop=0.02" in flags[0] and "forgetting_max_wer_rise=0.05" in flags[1]
    assert drop_flags("en", {"model": {"lid_accuracy": 0.0, "normalized_wer": 1.0}}, 0.02, 0.05) == []


# ------------------------------------------------------------------ eval end to end


@pytest.fixture(scope="module")
def lf_data(tmp_path_factory, tiny_model_dir):
    """A run whose test split joins into one 37.5-s recording (two windows), and an English set."""
    from lib.audio import decode
    from tests.helpers import make_run

    d = tmp_path_factory.mktemp("lf-data")
    make_run(d, tiny_model_dir, name="lf-run", data="lf-hi")
    write_prepared(d / "prepared" / "lf-hi", tiny_model_dir, {
        "train": [("नमस्ते", tone(0.5))],
        "test": [(f"वाक्य {i}", tone(9.0, 300 + 100 * i)) for i in range(4)],
    })
    en = [("We will meet at noon.", decode(FIXTURES / "manifest" / "clips" / "en_4.wav")),
          ("Thank you very much.", decode(FIXTURES / "manifest" / "clips" / "en_5.wav"))]
    write_prepared(d / "prepared" / "en-clips", tiny_model_dir, {"test": en}, language="en")
    return d


def test_eval_reports_longform_and_other_languages(lf_data, monkeypatch, caplog):
    from jobs.eval import EvalConfig, main
    from lib.env import Env

    detected = iter([["hi", "hi"], ["en", "en"]])  # the adapter (scored first) forgets, the base does not
    monkeypatch.setattr("lib.evaluate.forgetting.detect_languages", lambda *a, **k: next(detected))
    cfg = EvalConfig(run="lf-run", batch_size=4, max_new_tokens=8, also=["en-clips"],
                     longform=LongformConfig(minutes=0.65, recordings=2, max_new_tokens=8))
    with caplog.at_level(logging.WARNING, logger="whisper_ft"):
        main(cfg, Env(data_dir=lf_data))
    out = lf_data / "runs" / "lf-run" / "eval"
    report = json.loads((out / "report.json").read_text())

    lf = report["longform"]
    assert lf["recordings"] == 1 and lf["audio_minutes"] == pytest.approx((4 * 9 + 3 * 0.5) / 60, abs=1e-3)
    assert set(lf["results"]) == {"adapter", "base"}
    for m in lf["results"].values():
        assert 0 <= m["normalized_wer"] and 0 <= m["timestamps"]["valid_share"] <= 1
        assert m["timestamps"]["segments"] >= 2  # more than one 30-s window was decoded
    for items in lf["items"].values():
        segs = items[0]["segments"]
        assert segs[-1]["start"] > 0 and items[0]["clips"] == ["test-0", "test-1", "test-2", "test-3"]

    also = report["also"]["en-clips"]
    assert also["language"] == "en" and also["clips"] == 2
    assert also["results"]["adapter"]["lid_accuracy"] == 0.0 and also["results"]["base"]["lid_accuracy"] == 1.0
    assert all(0 <= r["normalized_wer"] for r in also["results"].values())
    assert len(report["forgetting_flags"]) == 1 and "language-ID accuracy fell" in report["forgetting_flags"][0]
    assert any("forgetting" in r.getMessage() for r in caplog.records)

    md = (out / "report.md").read_text()
    assert "## Long-form" in md and "segments with valid, increasing timestamps" in md
    assert "## Other languages" in md and "| en-clips | en | 2 |" in md and "**flag**" in md


def test_eval_scores_a_longform_manifest_of_your_own(lf_data, tmp_path):
    import soundfile as sf

    from jobs.eval import EvalConfig, main
    from lib.env import Env

    audio = np.concatenate([tone(16.0, 300), tone(16.0, 600)])
    sf.write(tmp_path / "talk.wav", audio, 16_000)
    (tmp_path / "long.csv").write_text("audio,text\ntalk.wav,एक लंबी बात\n")
    cfg = EvalConfig(run="lf-run", batch_size=4, max_new_tokens=8, compare_base=False, out=str(tmp_path / "out"),
                     longform=LongformConfig(manifest=str(tmp_path / "long.csv"), max_new_tokens=6))
    report = main(cfg, Env(data_dir=lf_data))
    assert report["longform"]["recordings"] == 1 and "long.csv" in report["longform"]["source"]
    assert list(report["longform"]["results"]) == ["adapter"]
    assert report["longform"]["references"] == ["एक लंबी बात"]
    with pytest.raises(UserError, match="also=no-such-set"):
        main(EvalConfig(run="lf-run", out=str(tmp_path / "o1"), max_new_tokens=4, compare_base=False,
                        also=["no-such-set"], longform=LongformConfig(recordings=0)), Env(data_dir=lf_data))
    (tmp_path / "bad.csv").write_text("audio,text\nmissing.wav,x\n")
    with pytest.raises(UserError, match="bad.csv line 2"):
        main(EvalConfig(run="lf-run", out=str(tmp_path / "o2"), max_new_tokens=4, longform=LongformConfig(
            manifest=str(tmp_path / "bad.csv"))), Env(data_dir=lf_data))
