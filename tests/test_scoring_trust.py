"""Issue 11, scoring side: one text canonicalization for targets and scores; the WER plot's unit."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np

# ---------------------------------------------------------------- item 6: training-curve WER unit


def _eval_wer_as_the_trainer_logs_it(tokenizer, errors: int, words: int = 200) -> float:
    """eval_wer as Seq2SeqTrainer logs it: lib.trainer's compute_metrics on token ids."""
    from lib.trainer import make_compute_metrics

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

    from lib.report import plot_training_curves

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
