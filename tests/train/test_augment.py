"""Training samples (lib/train/augment.py): timestamped and prompted labels, no-speech clips, audio
augmentation, SpecAugment; ids checked for a v2 tokenizer and a v3-like one (<|yue|> added)."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from transformers import WhisperFeatureExtractor, WhisperTokenizer

from lib.errors import UserError
from lib.train import augment as A
from lib.train.collator import IGNORE_INDEX, WhisperCollator, strip_decoder_start
from lib.train.config import TrainSection
from tests.helpers import TOKENIZER_DIR, tone, v3_like_tokenizer_dir

SENTENCES = ["नमस्ते", "हाँ जी नमस्ते", "धन्यवाद", "पानी", "घर", "नहीं"]


@pytest.fixture(scope="module", params=["v2", "v3"])
def tokenizer(request, tmp_path_factory):
    where = TOKENIZER_DIR if request.param == "v2" else v3_like_tokenizer_dir(tmp_path_factory.mktemp("v3tok"))
    tok = WhisperTokenizer.from_pretrained(where, language="hi", task="transcribe")
    tok.version = request.param
    return tok


def names(tok, ids) -> list[str]:
    return tok.convert_ids_to_tokens([int(i) for i in ids])


def split(n: int, tok, seconds: float = 1.0):
    """A numpy-formatted train split like lib.train.trainer._columns gives: n clips of `seconds`."""
    from datasets import Dataset

    rows = {"audio": [tone(seconds, 200 + 10 * i) for i in range(n)],
            "labels": [tok(SENTENCES[i % len(SENTENCES)]).input_ids for i in range(n)]}
    return Dataset.from_dict(rows).with_format("numpy")


def test_special_ids_are_looked_up_by_name(tokenizer):
    t = A.SpecialTokens.of(tokenizer)
    assert names(tokenizer, [t.sot, t.eot, t.no_timestamps, t.timestamp_begin, t.start_of_prev, t.no_speech]) == [
        "<|startoftranscript|>", "<|endoftext|>", "<|notimestamps|>", "<|0.00|>", "<|startofprev|>", "<|nospeech|>"]
    # v3's <|yue|> moves every id from <|translate|> up by one: a v2 constant would be off by one there
    shift = 1 if tokenizer.version == "v3" else 0
    assert (t.no_timestamps, t.timestamp_begin, t.start_of_prev, t.no_speech) == (
        50363 + shift, 50364 + shift, 50361 + shift, 50362 + shift)
    assert names(tokenizer, [t.timestamp(7.337), t.timestamp(0.01), t.timestamp(45.0)]) == [
        "<|7.34|>", "<|0.00|>", "<|30.00|>"]


def test_no_speech_falls_back_to_nocaptions():
    """Older v2 tokenizer files call 50362 <|nocaptions|>; unknown names come back as <|endoftext|>."""
    vocab = {"<|startoftranscript|>": 1, "<|endoftext|>": 2, "<|notimestamps|>": 3, "<|0.00|>": 10,
             "<|30.00|>": 1510, "<|startofprev|>": 4, "<|nocaptions|>": 5}
    inverse = {v: k for k, v in vocab.items()}
    fake = SimpleNamespace(convert_tokens_to_ids=lambda n: vocab.get(n, 2), convert_ids_to_tokens=inverse.get)
    assert A.SpecialTokens.of(fake).no_speech == 5
    del vocab["<|nocaptions|>"]
    with pytest.raises(UserError, match="nospeech"):
        A.SpecialTokens.of(fake)


def test_timestamped_labels(tokenizer):
    prepared = tokenizer("हाँ जी नमस्ते").input_ids
    t = A.SpecialTokens.of(tokenizer)
    out = A.timestamped(prepared, 3.337, t)
    assert names(tokenizer, out[:4]) == ["<|startoftranscript|>", "<|hi|>", "<|transcribe|>", "<|0.00|>"]
    assert names(tokenizer, out[-2:]) == ["<|3.34|>", "<|endoftext|>"]
    assert out[4:-2] == prepared[4:-1]  # the text itself is untouched
    assert t.no_timestamps not in out
    # the start-token strip still drops exactly <|startoftranscript|>
    assert strip_decoder_start([out], t.sot)[0] == out[1:]


def test_proportions_follow_the_flags_and_the_seed(tokenizer):
    t = TrainSection(timestamp_probability=0.3, prompt_probability=0.5, no_speech_fraction=0.2, seed=7)
    s = A.TrainingSamples(split(400, tokenizer, 0.2), tokenizer, t)
    assert len(s) == 500  # 400 clips + 400 x 0.2 / 0.8 no-speech clips = 20 % of all samples
    ids = A.SpecialTokens.of(tokenizer)
    rows = [s[i] for i in range(len(s))]
    speech, silent = rows[:400], rows[400:]
    stamped = sum(ids.timestamp_begin in r["labels"] for r in speech) / 400
    prompted = sum(bool(r["prompt"]) for r in speech[1:]) / 399
    assert abs(stamped - 0.3) < 0.07 and abs(prompted - 0.5) < 0.08  # ~3 binomial sd at n=400
    assert all(ids.no_timestamps in r["labels"] for r in speech if ids.timestamp_begin not in r["labels"])
    assert all(r["labels"] == [ids.sot, ids.no_speech, ids.eot] and not r["prompt"] for r in silent)
    # deterministic per seed (any worker, any epoch), different for another seed
    again = A.TrainingSamples(split(400, tokenizer, 0.2), tokenizer, t)
    assert [again[i]["labels"] for i in range(0, 500, 7)] == [rows[i]["labels"] for i in range(0, 500, 7)]
    other = A.TrainingSamples(split(400, tokenizer, 0.2), tokenizer, TrainSection(timestamp_probability=0.3, seed=8))
    assert [other[i]["labels"] for i in range(400)] != [r["labels"] for r in speech]


def test_prompt_is_the_previous_clips_text(tokenizer):
    s = A.TrainingSamples(split(6, tokenizer), tokenizer, TrainSection(prompt_probability=1.0))
    assert s[0]["prompt"] == []  # nothing before the first clip
    for i in range(1, 6):
        prev = tokenizer(SENTENCES[i - 1]).input_ids
        assert s[i]["prompt"] == prev[4:-1]  # text only: no prefix, no <|endoftext|>


def test_collator_places_the_prompt_and_masks_it(tokenizer):
    t = A.SpecialTokens.of(tokenizer)
    fe = WhisperFeatureExtractor(feature_size=80)
    prompted = {"audio": tone(1.0), "labels": tokenizer("नमस्ते").input_ids, "prompt": [100, 101, 102]}
    plain = {"audio": tone(0.5), "labels": tokenizer("हाँ जी नमस्ते").input_ids, "prompt": []}
    batch = WhisperCollator(fe, t.sot, start_of_prev=t.start_of_prev)([prompted, plain])
    dec, lab = batch["decoder_input_ids"], batch["labels"]
    assert dec.shape == lab.shape
    n = len(prompted["labels"])
    assert dec[0, :5].tolist() == [t.start_of_prev, 100, 101, 102, t.sot]
    assert lab[0, :4].tolist() == [IGNORE_INDEX] * 4  # targets 100, 101, 102 and <|sot|>: context
    assert lab[0, 4:4 + n - 1].tolist() == prompted["labels"][1:]  # <|hi|> ... <|endoftext|>
    # the unprompted row gets what the start-token strip and the model's own shift would give it
    m = len(plain["labels"])
    assert dec[1, :m - 1].tolist() == plain["labels"][:-1]
    assert lab[1, :m - 1].tolist() == plain["labels"][1:] and (lab[1, m - 1:] == IGNORE_INDEX).all()
    # without prompts the batch is the old one: no decoder_input_ids, SOT stripped
    old = WhisperCollator(fe, t.sot, start_of_prev=t.start_of_prev)([plain, {**prompted, "prompt": []}])
    assert "decoder_input_ids" not in old and old["labels"][0, 0].item() == tokenizer.convert_tokens_to_ids("<|hi|>")


def test_explicit_decoder_inputs_match_the_models_shift(tiny_model_dir):
    """An unprompted row through with_prompts has the same loss as through the model's own shift:
    the explicit inputs are exactly <|sot|> + labels[:-1]."""
    from transformers import WhisperForConditionalGeneration

    from lib.train.collator import pad_labels, with_prompts

    tok = WhisperTokenizer.from_pretrained(tiny_model_dir, language="hi", task="transcribe")
    model = WhisperForConditionalGeneration.from_pretrained(tiny_model_dir).eval()
    rows = [tok("नमस्ते").input_ids, tok("हाँ जी नमस्ते").input_ids]
    feats = torch.randn(2, 80, 3000)
    dec, lab = with_prompts(rows, [[], []], 50258, tok.convert_tokens_to_ids("<|startofprev|>"))
    with torch.no_grad():
        explicit = model(input_features=feats, decoder_input_ids=dec, labels=lab).loss
        shifted = model(input_features=feats, labels=pad_labels(strip_decoder_start(rows, 50258))).loss
    torch.testing.assert_close(explicit, shifted)


def test_no_speech_audio_generated_and_from_a_folder(tmp_path):
    import soundfile as sf

    levels = []
    for i in range(30):
        x = A.no_speech_audio(np.random.default_rng(i), [])
        assert 1.0 <= len(x) / 16_000 <= 30.0 and x.dtype == np.float32
        levels.append(float(np.sqrt(np.mean(x.astype(np.float64) ** 2))))
    assert min(levels) == 0.0  # some digital silence
    assert 10 ** (-72 / 20) < max(levels) < 10 ** (-18 / 20)  # noise within -70..-20 dBFS (+ pink's peak margin)
    sf.write(tmp_path / "fan.wav", 0.01 * np.ones(40 * 16_000, np.float32), 16_000)
    files = A.no_speech_files(str(tmp_path))
    x = A.no_speech_audio(np.random.default_rng(0), files)
    assert len(x) == 30 * 16_000 and np.allclose(x, 0.01, atol=1e-3)  # a 30-s window of the 40-s file
    with pytest.raises(UserError, match="train.no_speech_dir"):
        A.no_speech_files(str(tmp_path / "missing"))


def test_audio_augmentation_each_flag(tokenizer):
    ds = split(8, tokenizer, 2.0)
    off = A.TrainingSamples(ds, tokenizer, TrainSection())
    for i in range(8):  # every flag off: the prepared row as it was
        assert np.array_equal(off[i]["audio"], ds[i]["audio"]) and off[i]["labels"] == list(ds[i]["labels"])
    fast = A.TrainingSamples(ds, tokenizer, TrainSection(speed_perturb=0.2))
    lengths = [len(fast[i]["audio"]) / 16_000 for i in range(8)]
    assert all(2 / 1.2 - 0.01 <= n <= 2 / 0.8 + 0.01 for n in lengths) and len(set(lengths)) > 1
    loud = A.TrainingSamples(ds, tokenizer, TrainSection(gain_db=6))
    ratios = [np.abs(loud[i]["audio"]).max() / np.abs(ds[i]["audio"]).max() for i in range(8)]
    assert all(10 ** (-6 / 20) - 1e-3 <= r <= 10 ** (6 / 20) + 1e-3 for r in ratios) and np.std(ratios) > 0.01
    noisy = A.TrainingSamples(ds, tokenizer, TrainSection(noise_snr_db=10))
    for i in range(8):
        clean = ds[i]["audio"].astype(np.float64)
        snr = 10 * np.log10(np.mean(clean ** 2) / np.mean((noisy[i]["audio"] - clean) ** 2))
        assert 9 <= snr <= 31


def test_speed_keeps_the_timestamp_right_and_the_clip_within_30_s(tokenizer):
    ds = split(6, tokenizer, 29.0)
    s = A.TrainingSamples(ds, tokenizer, TrainSection(speed_perturb=0.2, timestamp_probability=1.0))
    for i in range(6):
        row = s[i]
        assert len(row["audio"]) <= 30 * 16_000
        end = names(tokenizer, row["labels"][-2:-1])[0]
        assert float(end.strip("<|>")) == pytest.approx(round(len(row["audio"]) / 16_000 / 0.02) * 0.02, abs=1e-6)


@pytest.mark.parametrize("flag,value", [("timestamp_probability", 1.5), ("prompt_probability", -0.1),
                                        ("no_speech_fraction", 0.6), ("speed_perturb", 0.7), ("gain_db", -1),
                                        ("mask_time_prob", 2)])
def test_bad_values_name_the_flag(flag, value):
    with pytest.raises(UserError, match=f"train.{flag}="):
        TrainSection(**{flag: value})


def test_no_speech_dir_without_fraction_is_refused():
    with pytest.raises(UserError, match="train.no_speech_fraction"):
        TrainSection(no_speech_dir="/noise")


@pytest.mark.parametrize("on", [True, False])
def test_spec_augment_masks_the_encoder_input_in_training_only(tiny_model_dir, on):
    """Whisper configs ship apply_spec_augment=false: mask_time_prob alone masked nothing."""
    from lib.config import load_config
    from lib.train.config import TrainConfig, TrainPlan
    from lib.train.lora import build_training_model

    cfg = load_config(TrainConfig, None, [
        "run=r", "data=d", "language=hi", f"model.base={tiny_model_dir}", "model.quantization=none",
        "model.precision=fp32", "model.gradient_checkpointing=false", "lora.r=2", f"train.spec_augment={on}",
        "train.mask_time_prob=0.2", "train.mask_feature_prob=0.2"])
    model, base = build_training_model(cfg, TrainPlan(language="hi", precision="fp32"))
    seen = []
    hook = base.model.encoder.conv1.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().clone()))
    feats = torch.rand(2, 80, 3000) + 0.5  # no zeros of its own
    labels = torch.tensor([[50276, 50359, 50363, 400, 50257]] * 2)
    try:
        model.train()
        model(input_features=feats.clone(), labels=labels)
        model.eval()
        model(input_features=feats.clone(), labels=labels)
    finally:
        hook.remove()
    train_in, eval_in = seen
    assert torch.equal(eval_in, feats)  # evaluation never masks
    zero_frames = (train_in == 0).all(dim=1).float().mean().item()  # whole time steps zeroed
    zero_bins = (train_in == 0).all(dim=2).float().mean().item()  # whole mel bins zeroed
    if on:
        assert 0.1 < zero_frames < 0.4 and 0.05 < zero_bins < 0.4
    else:
        assert torch.equal(train_in, feats)


def test_no_speech_label_empty_is_the_forced_prompt_then_eot(tokenizer):
    s = A.TrainingSamples(split(4, tokenizer), tokenizer, TrainSection(no_speech_fraction=0.5, no_speech_label="empty"))
    assert len(s) == 8
    assert names(tokenizer, s[5]["labels"]) == [
        "<|startoftranscript|>", "<|hi|>", "<|transcribe|>", "<|notimestamps|>", "<|endoftext|>"]


def test_labels_without_the_prepared_prefix_fail_at_start(tokenizer):
    from datasets import Dataset

    ds = Dataset.from_dict({"audio": [tone(0.5)], "labels": [[1, 2, 3, 4, 5, 6]]}).with_format("numpy")
    with pytest.raises(UserError, match="prepare the data again"):
        A.TrainingSamples(ds, tokenizer, TrainSection(timestamp_probability=0.5))


def test_turning_an_option_on_keeps_the_other_choices(tokenizer):
    ds = split(40, tokenizer, 0.5)
    stamps = TrainSection(timestamp_probability=0.5, prompt_probability=0.5)
    more = TrainSection(timestamp_probability=0.5, prompt_probability=0.5, noise_snr_db=10, speed_perturb=0.1)
    a, b = A.TrainingSamples(ds, tokenizer, stamps), A.TrainingSamples(ds, tokenizer, more)
    ts = A.SpecialTokens.of(tokenizer).timestamp_begin
    assert [ts in a[i]["labels"] for i in range(40)] == [ts in b[i]["labels"] for i in range(40)]
    assert [a[i]["prompt"] for i in range(40)] == [b[i]["prompt"] for i in range(40)]
