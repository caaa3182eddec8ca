"""Batches for Whisper training: log-mel features from raw audio, padded labels.

Prepared rows carry raw 16 kHz audio (lib/dataset/prepared.py), so log-mel is computed here, per
batch, with the model's own WhisperFeatureExtractor: 8 clips -> 8 x 80 x 3000 mel frames
(Whisper always sees 30 s windows; 128 mel bins for large-v3). Doing it per batch keeps the
prepared set 1/3 the size of stored features and costs ~10 ms per clip on one CPU core.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from lib.audio import log_mel
from lib.whisper import SAMPLING_RATE

IGNORE_INDEX = -100  # positions the cross-entropy loss skips


@dataclass
class WhisperCollator:
    """Turn rows {audio, labels} into {input_features, labels} tensors."""

    feature_extractor: Any
    """the model's WhisperFeatureExtractor (80 or 128 mel bins)"""
    decoder_start_token_id: int
    """<|startoftranscript|> (50258 for every multilingual Whisper), from the model config"""
    sampling_rate: int = SAMPLING_RATE
    start_of_prev: int | None = None
    """<|startofprev|> of the base's tokenizer: needed only when rows carry a `prompt` (lib/train/augment.py)"""
    mask_language: int | None = None
    """train.mask_language_token: this language token's id (e.g. <|hi|>) is left out of the loss
    where it is a row's first target; None = trained, as the walkthrough does"""

    label_multiple: int = 1
    """label rows are padded to a multiple of this (with -100: nothing added to the loss). With
    train.compile a new label width is a new input shape; 64 keeps the shapes a run can meet to
    7 (64, 128, ..., 448) instead of one per longest label, so packed windows (labels of 150-448
    tokens) do not recompile the decoder layers batch after batch"""

    count: bool = False
    """add what the batch holds (COUNT_KEYS: clips, seconds of clip audio, label tokens) for the
    speed metrics; the Trainer takes them out before the model sees the batch (lib/train/trainer.py)"""

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        audio = [np.asarray(r["audio"], dtype=np.float32) for r in rows]
        feats = log_mel(self.feature_extractor, audio, self.sampling_rate)
        counts = batch_counts(rows, self.sampling_rate) if self.count else {}
        if any(len(r.get("prompt", ())) for r in rows):
            decoder_input_ids, labels = with_prompts(
                [list(map(int, r["labels"])) for r in rows], [list(map(int, r.get("prompt", ()))) for r in rows],
                self.decoder_start_token_id, self.start_of_prev, self.label_multiple)
            return {"input_features": feats, "labels": mask_language_target(labels, self.mask_language),
                    "decoder_input_ids": decoder_input_ids, **counts}
        labels = strip_decoder_start(
            [list(map(int, r["labels"])) for r in rows], self.decoder_start_token_id
        )
        return {"input_features": feats,
                "labels": mask_language_target(pad_labels(labels, multiple=self.label_multiple), self.mask_language),
                **counts}


COUNT_KEYS = ("count_samples", "count_clips", "count_clip_seconds", "count_label_tokens")
"""what a training batch holds beside its tensors, for windows/s, clips/s, label tokens/s and audio-hours
per GPU-hour: a packed window (lib/train/packing.py) is one sample of several clips"""


def batch_counts(rows: list[dict[str, Any]], sampling_rate: int = SAMPLING_RATE) -> dict[str, float]:
    """COUNT_KEYS of a batch. A row's clips: its `clips` (a packed window's count, 0 for no speech),
    else 1 (0 for a no-speech clip); its clip seconds: `clip_seconds` (a window's clips without the
    pauses between them), else its audio's length (one clip: speech as prepared, never the padding
    up to 30 s); its label tokens: what the decoder is trained to write (all but <|sot|>)."""
    clips = sum(int(r["clips"]) if "clips" in r else int(r.get("corpus") != "no-speech") for r in rows)
    seconds = sum(float(r["clip_seconds"]) if "clip_seconds" in r else len(r["audio"]) / sampling_rate
                  for r in rows)
    tokens = sum(max(len(r["labels"]) - 1, 0) for r in rows)
    return dict(zip(COUNT_KEYS, (len(rows), clips, seconds, tokens), strict=True))


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


def with_prompts(labels: list[list[int]], prompts: list[list[int]], decoder_start_token_id: int,
                 start_of_prev: int | None, multiple: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """(decoder_input_ids, labels) for rows conditioned on previous text, as long-form decoding does.

    A row is `<|startofprev|> prompt <|sot|> <|hi|> ... text <|eot|>`; the decoder reads all but
    the last token and predicts all but the first. The model's own shift cannot build this (it
    puts decoder_start_token_id = <|sot|> first), so the inputs are given explicitly. The prompt
    and the <|sot|> after it are context, not targets: their labels are -100, so the loss counts
    the same tokens as an unprompted row (<|hi|> onwards). Rows without a prompt in the batch read
    `<|sot|> ...` and predict `<|hi|> ...`: exactly what the start-token strip gives them.
    """
    if start_of_prev is None:
        raise ValueError("rows carry a prompt but the collator has no start_of_prev token id")
    inputs, targets = [], []
    for row, prompt in zip(labels, prompts, strict=True):
        if not row or row[0] != decoder_start_token_id:
            raise ValueError(f"a label row must start with <|startoftranscript|> ({decoder_start_token_id}) "
                             f"to take a prompt: {row[:4]}")
        full = ([start_of_prev, *prompt] if prompt else []) + row
        masked = len(prompt) + 1 if prompt else 0  # the targets prompt[0..k-1] and <|sot|>: context only
        inputs.append(full[:-1])
        targets.append([IGNORE_INDEX] * masked + full[1 + masked:])
    # Padding inputs sit after each row's last real token: causal attention never lets a real
    # position see them and their targets are -100, so any id works; <|endoftext|> (the row's last) is used.
    return pad_labels(inputs, pad=labels[0][-1], multiple=multiple), pad_labels(targets, multiple=multiple)


def mask_language_target(labels: torch.Tensor, language_id: int | None) -> torch.Tensor:
    """Set each row's first target to -100 where it is `language_id` (the <|hi|> after <|sot|>).

    Why: every training label starts <|sot|> <|hi|>, so the loss at that position teaches the model
    that any audio is Hindi, and language detection (the likeliest token after <|sot|>) says hi for
    English speech too: measured on real whisper-base, English language-ID accuracy fell from 100 %
    to 0 % in 60 LoRA steps (docs/results.md, "Timestamps, no-speech and forgetting"). The
    decoder still reads <|hi|> as input, so forced-language training and decoding are unchanged.
    Rows whose first target is another token (<|nospeech|> no-speech rows) keep it."""
    if language_id is None or labels.numel() == 0:
        return labels
    first = (labels != IGNORE_INDEX).int().argmax(dim=1)  # first real target per row
    rows = torch.arange(labels.shape[0])
    hit = labels[rows, first] == language_id
    labels[rows[hit], first[hit]] = IGNORE_INDEX
    return labels


def pad_labels(labels: list[list[int]], pad: int = IGNORE_INDEX, multiple: int = 1) -> torch.Tensor:
    """Right-pad with -100 so padding adds nothing to the loss (decoder inputs: with `pad`), to
    the longest row rounded up to a multiple of `multiple`."""
    width = max((len(r) for r in labels), default=0)
    width = -(-width // multiple) * multiple
    out = torch.full((len(labels), width), pad, dtype=torch.long)
    for i, row in enumerate(labels):
        out[i, : len(row)] = torch.tensor(row, dtype=torch.long)
    return out
