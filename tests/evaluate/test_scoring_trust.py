"""Issue 11, scoring side: one text canonicalization for targets and scores; the WER plot's unit."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np

# ---------------------------------------------------------------- item 6: training-curve WER unit


def _eval_wer_as_the_trainer_logs_it(tokenizer, errors: int, words: int = 200) -> float:
    """eval_wer as Seq2SeqTrainer logs it: lib.train.trainer's compute_metrics on token ids."""
    from lib.train.trainer import make_compute_metrics

    refs = [" ".join(f"w{i}" for i in range(words))]
    hyps = [" ".join("x" if i < errors else f"w{i}" for i in range(words))]

    def ids(texts):
        rows = [tokenizer(t).input_ids for t in texts]
        width = max(len(r) for r in rows)
        return np.array([r + [-100] * (width - len(r)) for r in rows])

    return make_compute_metrics(tokenizer)(SimpleNamespace(predictions=ids(hyps), label_ids=ids(refs)))["wer"]


def test_training_curve_plots_low_wers_at_their_value(tiny_model_dir, tmp_path, monkeypatch):
    import matplotlib.figure
    from transformers import WhisperTokenizer

    from lib.evaluate.report import plot_training_curves

    tok = WhisperTokenizer.from_pretrained(tiny_model_dir)
    # A good run: 1.5 %, 1 % and 0.5 % WER at steps 10, 20, 30 (every value <= 1.5).
    history = [{"step": 10 * (k + 1), "eval_wer": _eval_wer_as_the_trainer_logs_it(tok, e), "eval_loss": 0.1}
               for k, e in enumerate((3, 2, 1))]
    history[0]["loss"] = 0.5
    (tmp_path / "log_history.json").write_text(json.dumps(history))
    drawn = []
    real_savefig = matplotlib.figure.Figure.savefig

    def keep(fig, *a, **k):
        drawn.append([list(line.get_ydata()) for ax in fig.axes for line in ax.lines if "WER" in line.get_label()])
        return real_savefig(fig, *a, **k)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", keep)
    assert plot_training_curves(tmp_path / "log_history.json", tmp_path / "curves.png")
    assert drawn == [[[1.5, 1.0, 0.5]]]  # percent, as labelled; main drew 150, 100, 50


# ---------------------------------------------------------------- item 5: one canonical spelling

# Real Hindi, each pair the same words in two spellings a reader cannot tell apart.
ZA_ONE = "\u095b"            # ज़ as one code point (DEVANAGARI LETTER ZA)
ZA_TWO = "\u091c\u093c"      # ज + nukta, what most keyboards type
PAIRS = [
    ("वर्ष २०२४ में ३ चुनाव हुए।", "वर्ष 2024 में 3 चुनाव हुए।"),           # Devanagari vs ASCII digits
    (f"{ZA_ONE}रूर आइए, ब{ZA_ONE}ार चलें।", f"{ZA_TWO}रूर आइए, ब{ZA_TWO}ार चलें।"),  # nukta, NFC
    ("यह परीक्\u200dषा कठिन है।", "यह परीक्षा कठिन है।"),                     # ZWJ half form
    ("शक्\u200cति का प्रयोग", "शक्ति का प्रयोग"),                             # ZWNJ
]


def test_canonical_spelling_of_real_hindi_strings():
    from lib.metrics import canonical

    for a, b in PAIRS:
        assert a != b and canonical(a) == canonical(b)
    assert canonical("वर्ष २०२४ में\u200d") == "वर्ष 2024 में"
    # Not a normalizer for scoring: case, danda and vowel signs stay.
    assert canonical("Hello, दुनिया।") == "Hello, दुनिया।"
    assert canonical("किताब") != canonical("कीताब")


def test_scores_count_no_error_for_spelling_variants():
    from lib.metrics import score

    refs, hyps = [a for a, _ in PAIRS], [b for _, b in PAIRS]
    metrics, utts = score(refs, hyps)
    assert metrics["normalized_wer"] == 0 and metrics["wer"] == 0 and metrics["cer"] == 0
    assert all(u.word_errors == 0 for u in utts)
    # A real error is still one: a wrong vowel sign in one word of the first pair (6 words).
    metrics, _ = score([refs[0]], ["वर्ष 2024 में 3 चूनाव हुए।"])
    assert metrics["normalized_wer"] == 1 / 6


def test_prepare_trains_on_the_canonical_spelling(tiny_model_dir, tmp_path):
    import shutil

    from transformers import WhisperTokenizer

    from jobs.prepare import PrepareConfig, main
    from lib.config import load_config
    from lib.env import Env
    from tests.helpers import MANIFEST_DIR, split_rows

    shutil.copytree(MANIFEST_DIR / "clips", tmp_path / "m" / "clips")
    rows = [{"audio": "clips/hi_0.mp3", "text": PAIRS[0][0]}, {"audio": "clips/hi_1.mp3", "text": PAIRS[0][1]},
            {"audio": "clips/en_0.wav", "text": PAIRS[1][0]}, {"audio": "clips/en_1.wav", "text": PAIRS[1][1]}]
    mf = tmp_path / "m" / "rows.jsonl"
    mf.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    cfg = load_config(PrepareConfig, None, [f"model={tiny_model_dir}", "num_proc=1", "name=c", "language=hi",
                                            "source.kind=manifest", f"source.path={mf}", "validation_fraction=0"])
    main(cfg, Env(data_dir=tmp_path / "data"))
    ds = split_rows(tmp_path / "data" / "prepared" / "c", "train")
    tok = WhisperTokenizer.from_pretrained(tiny_model_dir, language="hi", task="transcribe")
    by_id = {r["id"]: r for r in ds}
    assert by_id["clips/hi_0.mp3"]["text"] == by_id["clips/hi_1.mp3"]["text"] == "वर्ष 2024 में 3 चुनाव हुए।"
    assert by_id["clips/hi_0.mp3"]["labels"] == by_id["clips/hi_1.mp3"]["labels"]
    assert by_id["clips/en_0.wav"]["labels"] == by_id["clips/en_1.wav"]["labels"]
    assert by_id["clips/hi_0.mp3"]["labels"] == tok("वर्ष 2024 में 3 चुनाव हुए।").input_ids


def test_training_wer_scores_the_canonical_spelling_as_eval_does(tiny_model_dir):
    """The exact-text WER logged while training compares the canonical spelling, as `make eval`'s
    exact-text WER does: a hypothesis in ASCII digits is no error against Devanagari digits."""
    from types import SimpleNamespace

    from transformers import WhisperTokenizer

    from lib.metrics import score
    from lib.train.trainer import make_compute_metrics

    tok = WhisperTokenizer.from_pretrained(tiny_model_dir, language="hi", task="transcribe")
    ref, hyp = PAIRS[0]
    ids = lambda t: np.array([tok(t).input_ids])  # noqa: E731
    out = make_compute_metrics(tok)(SimpleNamespace(predictions=ids(hyp), label_ids=ids(ref)))
    assert out["wer"] == 100 * score([ref], [hyp])[0]["wer"] == 0.0
