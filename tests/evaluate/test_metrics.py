"""WER/CER and the normalizers against hand-computed values."""

import pytest

from lib.metrics import (
    BASIC_LABEL,
    basic_normalize,
    cer,
    hypothesis_flags,
    normalize,
    repeated_ngram,
    score,
    wer,
)


def test_normalize_keeps_vowel_signs_and_drops_danda():
    assert normalize("हमने उसका जन्मदिन मनाया।") == "हमने उसका जन्मदिन मनाया"
    assert normalize("  Hello,   WORLD!! ") == "hello world"
    # NFKC ligature, symbols, double danda; Devanagari digits as ASCII (canonical(), issue 11 item 5)
    assert normalize("ﬁne — “quoted” ॥ १२") == "fine quoted 12"
    # Whisper's basic normalizer deletes the combining marks (that is why it is only a comparison).
    assert basic_normalize("हमने उसका जन्मदिन मनाया।").strip() == "हमन उसक जन मद न मन य"


def test_wer_cer_by_hand():
    # "the cat sat" -> "the bat sat down": 1 substitution + 1 insertion over 3 words.
    assert wer(["the cat sat"], ["the bat sat down"]) == pytest.approx(2 / 3)
    # corpus rate = all edits / all reference words: (1 + 0) / (2 + 4), not the mean of 1/2 and 0.
    assert wer(["a b", "c d e f"], ["a x", "c d e f"]) == pytest.approx(1 / 6)
    # "abcd" -> "abed": 1 substitution over 4 characters.
    assert cer(["abcd"], ["abed"]) == pytest.approx(0.25)
    assert wer(["a"], [""]) == 1.0


def test_hindi_error_hidden_by_basic_normalizer_is_counted_by_ours():
    ref = ["हमने उसका जन्मदिन मनाया।"]
    hyp = ["हमने उसकी जन्मदिन मनाया"]  # उसका -> उसकी: a different word (vowel sign ा vs ी)
    metrics, utts = score(ref, hyp, ["u1"])
    assert metrics["normalized_wer"] == pytest.approx(1 / 4)
    assert metrics["basic_normalized_wer"] == 0.0  # the error disappears
    assert metrics["wer"] == pytest.approx(2 / 4)  # exact text also counts the dropped danda
    assert utts[0].word_errors == 1 and utts[0].ref_words == 4 and utts[0].id == "u1"
    assert "deletes Devanagari vowel signs" in BASIC_LABEL


def test_flags_for_loops_long_and_empty_outputs():
    assert repeated_ngram("a b c a b a b a b a b x") == "a b"
    assert repeated_ngram("the cat sat on the mat") is None
    assert repeated_ngram("哈哈哈哈") == "哈"
    assert hypothesis_flags("नमस्ते दुनिया", "") == ["empty"]
    assert hypothesis_flags("", "") == []
    assert hypothesis_flags("hi there", "yes yes yes yes yes yes yes") == ["repetition", "too_long"]
    assert hypothesis_flags("hello there friend", "hello there friend") == []
    m, _ = score(["one two", "three"], ["", "go go go go"])
    assert (m["empty"], m["repetition"], m["too_long"]) == (1, 1, 0)
