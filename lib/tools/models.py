"""Whisper models with random weights at a published size, and the FLOP count of a training sample.

For `make bench` (no Hub needed: the model is built from the architecture's config) and for
the tests' tiny model: both save with save_pretrained and load through the real
from_pretrained path.

The FLOP figures follow the device method: count the work first, then time only steady state.
A training sample of Whisper at 30 s costs, per forward, 2 x (matmul weights touched) x
(positions): the encoder runs every weight over 1,500 positions, the decoder over the label
length, and cross-attention's K/V projections over 1,500 positions per decoder layer. With a
frozen base, backward computes input gradients only (~1 forward); LoRA's own weight
gradients are negligible. Activation checkpointing adds one more forward.
"""

from __future__ import annotations

from dataclasses import dataclass

from lib.whisper import ENCODER_POSITIONS, EOT_ID, MAX_POSITIONS, MEL_FRAMES, SOT_ID

# The Whisper architectures `make bench arch=...` builds with random weights (from the
# published configs): d_model, encoder/decoder layers, heads, ffn, mel bins, vocab.
ARCHS: dict[str, dict] = {
    "tiny": dict(d_model=384, encoder_layers=4, decoder_layers=4, heads=6, ffn=1536, mels=80, vocab=51865),
    "base": dict(d_model=512, encoder_layers=6, decoder_layers=6, heads=8, ffn=2048, mels=80, vocab=51865),
    "small": dict(d_model=768, encoder_layers=12, decoder_layers=12, heads=12, ffn=3072, mels=80, vocab=51865),
    "medium": dict(d_model=1024, encoder_layers=24, decoder_layers=24, heads=16, ffn=4096, mels=80, vocab=51865),
    "large-v2": dict(d_model=1280, encoder_layers=32, decoder_layers=32, heads=20, ffn=5120, mels=80, vocab=51865),
    "large-v3": dict(d_model=1280, encoder_layers=32, decoder_layers=32, heads=20, ffn=5120, mels=128, vocab=51866),
    "large-v3-turbo": dict(d_model=1280, encoder_layers=32, decoder_layers=4, heads=20, ffn=5120, mels=128,
                           vocab=51866),
}


def whisper_config(arch: str):
    from transformers import WhisperConfig

    a = ARCHS[arch]
    return WhisperConfig(
        vocab_size=a["vocab"], num_mel_bins=a["mels"], d_model=a["d_model"],
        encoder_layers=a["encoder_layers"], decoder_layers=a["decoder_layers"],
        encoder_attention_heads=a["heads"], decoder_attention_heads=a["heads"],
        encoder_ffn_dim=a["ffn"], decoder_ffn_dim=a["ffn"],
        max_source_positions=ENCODER_POSITIONS, max_target_positions=MAX_POSITIONS,
        pad_token_id=EOT_ID, bos_token_id=EOT_ID, eos_token_id=EOT_ID, decoder_start_token_id=SOT_ID,
    )


def save_random_whisper(config, out, tokenizer_dir, seed: int = 0, device: str = "cpu", dtype=None):
    """A Whisper with random weights at `config`, saved with save_pretrained together with the
    real multilingual tokenizer and generation config from `tokenizer_dir`, so that it loads
    through the real from_pretrained path (tests' tiny model, `make bench`'s large ones). Its
    config.json says random_weights: true (lib.model.RANDOM_WEIGHTS), so that eval and train can say
    that its WERs mean nothing."""
    import json
    from pathlib import Path

    import torch
    from transformers import (
        GenerationConfig,
        WhisperFeatureExtractor,
        WhisperForConditionalGeneration,
        WhisperProcessor,
        WhisperTokenizer,
    )

    from lib.model import RANDOM_WEIGHTS

    tokenizer_dir, out = Path(tokenizer_dir), Path(out)
    torch.manual_seed(seed)
    with torch.device(device):  # 1.5 B parameters initialise in seconds on a GPU, minutes on a CPU
        model = WhisperForConditionalGeneration(config)
    if dtype is not None:
        model = model.to(dtype)
    gen = json.loads((tokenizer_dir / "generation_config.json").read_text())
    for k in ("transformers_version", "alignment_heads"):
        gen.pop(k, None)
    model.generation_config = GenerationConfig(**gen)
    setattr(model.config, RANDOM_WEIGHTS, True)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    WhisperProcessor(
        feature_extractor=WhisperFeatureExtractor(feature_size=config.num_mel_bins),
        tokenizer=WhisperTokenizer.from_pretrained(tokenizer_dir),
    ).save_pretrained(out)
    return out


@dataclass
class FlopCount:
    forward: float
    """FLOP of one forward pass of one 30 s sample"""

    def train(self, checkpointing: bool | float) -> float:
        """FLOP of one training sample with a frozen base: forward + input-grad backward
        (~1 forward) + one recompute forward under activation checkpointing (a share of one
        for model.checkpoint_fraction < 1)."""
        return self.forward * (2 + float(checkpointing))


def flops_per_sample(arch: str, label_tokens: int = 40) -> FlopCount:
    """Matmul FLOP (2 per multiply-add) of one 30 s sample with `label_tokens` decoder positions."""
    a = ARCHS[arch]
    d, f, enc_pos = a["d_model"], a["ffn"], ENCODER_POSITIONS
    # encoder layer: q,k,v,o (4 d^2) + ffn (2 d f) per position, attention scores+mix 2 x pos x d per position
    enc_layer = enc_pos * (2 * (4 * d * d + 2 * d * f) + 2 * 2 * enc_pos * d)
    # conv stem: conv1 (mels -> d, k=3) over 3000 frames, conv2 (d -> d, k=3, stride 2) over 1500
    conv = 2 * (MEL_FRAMES * a["mels"] * d * 3 + ENCODER_POSITIONS * d * d * 3)
    encoder = a["encoder_layers"] * enc_layer + conv
    t = label_tokens
    # decoder layer: self-attn 4 d^2, cross q/o 2 d^2, ffn 2 d f per token; cross K/V 2 d^2 per encoder position
    dec_layer = t * 2 * (6 * d * d + 2 * d * f) + t * 2 * 2 * (t + enc_pos) * d
    cross_kv = a["decoder_layers"] * enc_pos * 2 * 2 * d * d
    decoder = a["decoder_layers"] * dec_layer + cross_kv + t * 2 * d * a["vocab"]
    return FlopCount(forward=encoder + decoder)
