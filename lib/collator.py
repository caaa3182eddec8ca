"""Batches for Whisper training: log-mel features from raw audio, padded labels.

Prepared rows carry raw 16 kHz audio (lib/prepared.py), so log-mel is computed here, per
batch, with the model's own WhisperFeatureExtractor: 8 clips -> 8 x 80 x 3000 mel frames
(Whisper always sees 30 s windows; 128 mel bins for large-v3). Doing it per batch keeps the
prepared set 1/3 the size of stored features and costs ~10 ms per clip on one CPU core.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from lib.audio import SAMPLING_RATE

IGNORE_INDEX = -100  # positions the cross-entropy loss skips


@dataclass
class WhisperCollator:
    """Turn rows {audio, labels} into {input_features, labels} tensors."""

    feature_extractor: Any
    """the model's WhisperFeatureExtractor (80 or 128 mel bins)"""
    decoder_start_token_id: int
    """<|startoftranscript|> (50258 for every multilingual Whisper), from the model config"""
    sampling_rate: int = SAMPLING_RATE

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        audio = [np.asarray(r["audio"], dtype=np.float32) for r in rows]
        feats = self.feature_extractor(
            audio, sampling_rate=self.sampling_rate, return_tensors="pt"
        ).input_features
        labels = strip_decoder_start(
            [list(map(int, r["labels"])) for r in rows], self.decoder_start_token_id
        )
        return {"input_features": feats, "labels": pad_labels(labels)}


def strip_decoder_start(labels: list[list[int]], decoder_start_token_id: int) -> list[list[int]]:
    """Drop the leading <|startoftranscript|> when every row has it.

    Why: the tokenizer puts <|startoftranscript|> first, and the model prepends
    decoder_start_token_id itself when it shifts labels right into decoder inputs; keeping
    it would teach the model to predict SOT after SOT. The check must use
    decoder_start_token_id (50258), not bos_token_id (50257 = <|endoftext|>): the
    walkthrough compared with bos_token_id, which never matches, so it never stripped.
    """
    if labels and all(row and row[0] == decoder_start_token_id for row in labels):
        return [row[1:] for row in labels]
    return labels


def pad_labels(labels: list[list[int]]) -> torch.Tensor:
    """Right-pad with -100 so padding adds nothing to the loss."""
    width = max((len(r) for r in labels), default=0)
    out = torch.full((len(labels), width), IGNORE_INDEX, dtype=torch.long)
    for i, row in enumerate(labels):
        out[i, : len(row)] = torch.tensor(row, dtype=torch.long)
    return out
