"""The collator: log-mel per batch, -100 label padding, and the start-token strip."""

import numpy as np
import pytest
import torch
from transformers import WhisperFeatureExtractor, WhisperTokenizer

from lib.train.collator import IGNORE_INDEX, WhisperCollator, strip_decoder_start
from tests.helpers import TOKENIZER_DIR, tone

SOT = 50258  # <|startoftranscript|> = decoder_start_token_id
EOT = 50257  # <|endoftext|> = bos_token_id = eos = pad


def walkthrough_strip(labels: list[list[int]], tokenizer) -> list[list[int]]:
    """The walkthrough's check, kept as the counter-example: it compares with bos_token_id
    (<|endoftext|>), which a label row never starts with, so it never strips."""
    if all(row[0] == tokenizer.bos_token_id for row in labels):
        return [row[1:] for row in labels]
    return labels


@pytest.fixture(scope="module")
def tokenizer():
    return WhisperTokenizer.from_pretrained(TOKENIZER_DIR, language="hi", task="transcribe")


@pytest.mark.parametrize(
    "strip",
    [
        pytest.param(lambda labels, tok: strip_decoder_start(labels, SOT), id="ours"),
        pytest.param(walkthrough_strip, id="walkthrough", marks=pytest.mark.xfail(strict=True)),
    ],
)
def test_start_token_is_stripped(strip, tokenizer):
    labels = [tokenizer("नमस्ते").input_ids, tokenizer("हाँ जी").input_ids]
    assert all(row[0] == SOT for row in labels)  # what make prepare writes: SOT, <|hi|>, ...
    out = strip(labels, tokenizer)
    assert [row[0] for row in out] == [tokenizer.convert_tokens_to_ids("<|hi|>")] * 2
    assert [len(r) for r in out] == [len(r) - 1 for r in labels]


def test_no_strip_unless_every_row_starts_with_it():
    labels = [[SOT, 1, 2], [5, 6]]
    assert strip_decoder_start(labels, SOT) == labels


def test_batch_has_log_mel_and_padded_labels(tokenizer):
    fe = WhisperFeatureExtractor(feature_size=80)
    rows = [
        {"audio": tone(1.0, 300), "labels": tokenizer("नमस्ते").input_ids},
        {"audio": tone(1.5, 600).tolist(), "labels": np.array(tokenizer("हाँ जी नमस्ते").input_ids)},
    ]
    batch = WhisperCollator(fe, SOT)(rows)
    assert batch["input_features"].shape == (2, 80, 3000)  # 30 s windows, 10 ms hop
    assert batch["input_features"].dtype == torch.float32
    short, long_ = (len(r["labels"]) - 1 for r in rows)
    assert batch["labels"].shape == (2, long_)
    assert (batch["labels"][0, short:] == IGNORE_INDEX).all()
    assert batch["labels"][0, short - 1] == EOT  # the eos stays: the model must learn to stop
    assert (batch["labels"][1] != IGNORE_INDEX).all()


def test_compiled_runs_pad_labels_to_a_multiple_so_shapes_repeat(tokenizer):
    """train.compile: label widths rounded up to 64, with -100 (no loss), prompted rows too."""
    fe = WhisperFeatureExtractor(feature_size=80)
    ids = tokenizer("हाँ जी नमस्ते").input_ids
    rows = [{"audio": tone(1.0, 300), "labels": ids}]
    plain = WhisperCollator(fe, SOT)(rows)["labels"]
    padded = WhisperCollator(fe, SOT, label_multiple=64)(rows)["labels"]
    assert padded.shape == (1, 64) and plain.shape == (1, len(ids) - 1)
    assert torch.equal(padded[:, : plain.shape[1]], plain) and (padded[:, plain.shape[1]:] == IGNORE_INDEX).all()
    prompted = [{**rows[0], "prompt": [7, 8, 9]}]
    sop = tokenizer.convert_tokens_to_ids("<|startofprev|>")
    b = WhisperCollator(fe, SOT, start_of_prev=sop, label_multiple=64)(prompted)
    assert b["labels"].shape == b["decoder_input_ids"].shape == (1, 64)
    real = len(ids) + 4 - 1  # <|startofprev|> + 3 prompt tokens + the label, less one for the shift
    assert (b["labels"][0, real:] == IGNORE_INDEX).all() and (b["labels"][0, :real] != IGNORE_INDEX).any()


@pytest.mark.parametrize("lengths", [[4800], [80_000, 16_000, 161], [479_990], [480_000], [500_000, 800], [1]])
def test_log_mel_of_the_audio_only_equals_the_feature_extractors(lengths):
    """lib.audio.log_mel skips the STFT of the padding (a constant): same numbers, any length."""
    from transformers import WhisperFeatureExtractor

    from lib.audio import log_mel

    rng = np.random.default_rng(len(lengths))
    audio = [(0.1 * rng.standard_normal(n)).astype(np.float32) for n in lengths]
    for mels in (80, 128):
        fe = WhisperFeatureExtractor(feature_size=mels)
        ref = fe(audio, sampling_rate=16_000, return_tensors="pt").input_features
        got = log_mel(fe, audio)
        assert got.shape == ref.shape == (len(lengths), mels, 3000)
        assert torch.allclose(got, ref, atol=1e-5)


def test_mask_language_token_leaves_it_out_of_the_loss_only(tokenizer):
    """train.mask_language_token: the first target <|hi|> becomes -100 (plain and prompted rows);
    the rest of each row, and a no-speech row's <|nospeech|>, are still trained."""
    fe = WhisperFeatureExtractor(feature_size=80)
    hi = tokenizer.convert_tokens_to_ids("<|hi|>")
    nospeech = tokenizer.convert_tokens_to_ids("<|nocaptions|>")
    text = tokenizer("नमस्ते").input_ids
    rows = [{"audio": tone(1.0, 300), "labels": text}, {"audio": tone(1.0, 300), "labels": [SOT, nospeech, EOT]}]
    plain = WhisperCollator(fe, SOT)(rows)["labels"]
    masked = WhisperCollator(fe, SOT, mask_language=hi)(rows)["labels"]
    assert plain[0, 0] == hi and masked[0, 0] == IGNORE_INDEX
    assert torch.equal(masked[0, 1:], plain[0, 1:])
    assert torch.equal(masked[1], plain[1]) and masked[1, 0] == nospeech
    # with a previous-text prompt the <|hi|> target sits after the masked prompt and <|sot|>
    sop = tokenizer.convert_tokens_to_ids("<|startofprev|>")
    prompted = [{**rows[0], "prompt": tokenizer("हाँ", add_special_tokens=False).input_ids}, rows[1]]
    p_plain = WhisperCollator(fe, SOT, start_of_prev=sop)(prompted)["labels"]
    p_masked = WhisperCollator(fe, SOT, start_of_prev=sop, mask_language=hi)(prompted)["labels"]
    first = int((p_plain[0] != IGNORE_INDEX).int().argmax())
    assert p_plain[0, first] == hi and p_masked[0, first] == IGNORE_INDEX
    assert torch.equal(p_masked[0, first + 1:], p_plain[0, first + 1:])
