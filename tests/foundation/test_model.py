"""lib/model.py (the checks before loading, loading) and lib/train/lora.py (parameter counts, the encoder input-grad hook, checkpointing)."""

import json
import sys

import pytest
import torch

from lib import model as M
from lib.errors import UserError
from lib.language import resolve_language
from lib.train import lora as L
from lib.train.config import LoraSection


def test_large_v2_lora_r32_qv_has_15_728_640_trainable_params():
    # The large-v2 architecture, no weights: 32+32 layers, d_model 1280. q_proj and v_proj in
    # encoder self-attn (2 x 32) and decoder self- + cross-attn (4 x 32) = 192 layers,
    # each r x (1280 + 1280) = 32 x 2560 -> 192 x 81,920 = 15,728,640.
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    cfg = WhisperConfig(
        vocab_size=51865, num_mel_bins=80, d_model=1280, encoder_layers=32, decoder_layers=32,
        encoder_attention_heads=20, decoder_attention_heads=20, encoder_ffn_dim=5120,
        decoder_ffn_dim=5120, max_source_positions=1500, max_target_positions=448,
    )
    with torch.device("meta"):
        base = WhisperForConditionalGeneration(cfg)
        for p in base.parameters():
            p.requires_grad_(False)
        model = L.apply_lora(base, LoraSection())
    trainable, total = L.count_parameters(model)
    assert trainable == 15_728_640
    assert 0.009 < trainable / total < 0.011  # "about 1%" of ~1.56 B
    # fp32 adapter: 4 bytes each -> ~63 MB on disk
    assert trainable * 4 == pytest.approx(63e6, rel=0.01)


def test_all_linear_targets_every_linear_but_the_head(tiny_model_dir):
    from transformers import WhisperForConditionalGeneration

    base = WhisperForConditionalGeneration.from_pretrained(tiny_model_dir)
    model = L.apply_lora(base, LoraSection(r=2, alpha=4, target_modules=["all-linear"]))
    adapted = {n.split(".")[-1] for n, m in model.named_modules() if hasattr(m, "lora_A")}
    assert {"q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"} <= adapted
    assert "proj_out" not in adapted


def test_unknown_lora_target_is_a_user_error(tiny_model_dir):
    from transformers import WhisperForConditionalGeneration

    base = WhisperForConditionalGeneration.from_pretrained(tiny_model_dir)
    with pytest.raises(UserError, match="lora.target_modules=qproj"):
        L.apply_lora(base, LoraSection(target_modules=["qproj"]))


def test_non_whisper_base_is_refused_from_its_config(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 8}))
    with pytest.raises(UserError, match=r"model.base=.*'bert' model, not Whisper"):
        M.load_base_config(str(tmp_path))


def test_missing_base_names_the_flag(tmp_path):
    with pytest.raises(UserError, match="model.base="):
        M.load_base_config(str(tmp_path / "nope"))


def test_language_codes_and_names(tiny_model_dir):
    from transformers import WhisperTokenizer

    tok = WhisperTokenizer.from_pretrained(tiny_model_dir)
    assert resolve_language("hi", tok) == "hi"
    assert resolve_language("Hindi", tok) == "hi"
    with pytest.raises(UserError, match="language='klingon'"):
        resolve_language("klingon", tok)


def test_unknown_language_names_the_nearest_one(tiny_model_dir):
    from transformers import WhisperTokenizer

    from lib.language import check_language

    tok = WhisperTokenizer.from_pretrained(tiny_model_dir)
    with pytest.raises(UserError, match=r"language='hindu' is not a language .*; did you mean language=hi \(hindi\)\? "
                                        r"Use an ISO code"):
        resolve_language("hindu", tok)
    # before any tokenizer is loaded (lib/cli.py run_job checks a language= flag this way)
    check_language("Hindi")
    check_language("hi")
    with pytest.raises(UserError, match=r"did you mean language=en \(english\)\?"):
        check_language("eng")
    with pytest.raises(UserError, match=r"language='xx' is not a language Whisper knows\. Use .* Known codes: af, "):
        check_language("xx")  # nothing close: no guess


def test_precision_on_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert M.resolve_precision("auto") == "fp32"
    with pytest.raises(UserError, match="model.precision=fp16 needs a CUDA GPU"):
        M.resolve_precision("fp16")
    # bf16 by name is allowed (CPU autocast, for checking numerics), with a warning
    assert M.resolve_precision("bf16") == "bf16"


def test_quantization_without_bitsandbytes_is_a_user_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import raises ImportError
    with pytest.raises(UserError, match="model.quantization=nf4: bitsandbytes does not work"):
        M.check_quantization("nf4")
    M.check_quantization("none")  # needs nothing


@pytest.mark.parametrize("quantization", ["int8", "nf4"])
def test_quantization_works_here(quantization):
    M.check_quantization(quantization)  # bitsandbytes >= 0.49 has CPU kernels for both


def _encoder_lora_grads(model_dir, hook: bool) -> int:
    """Train-mode forward/backward with *reentrant* checkpointing and LoRA injected without
    get_peft_model's own input-grad hooks; count encoder LoRA tensors that got a gradient."""
    from peft import inject_adapter_in_model
    from transformers import WhisperForConditionalGeneration

    base = WhisperForConditionalGeneration.from_pretrained(model_dir)
    for p in base.parameters():
        p.requires_grad_(False)
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    if hook:
        L.add_encoder_input_grad_hook(base)
    model = inject_adapter_in_model(L.lora_config(2, 4, 0.0, ["q_proj", "v_proj"]), base)
    model.train()
    out = model(input_features=torch.randn(1, 80, 3000), labels=torch.tensor([[50259, 50359, 400, 50257]]))
    if not out.loss.requires_grad:  # nothing upstream of the loss can train
        return 0
    out.loss.backward()
    # lora_B starts at zero, so lora_A's first gradient is zero too: count grads that exist
    return sum(1 for n, p in model.named_parameters() if ".encoder.layers" in n and "lora_" in n and p.grad is not None)


def test_encoder_input_grad_hook_lets_encoder_lora_train_under_reentrant_checkpointing(tiny_model_dir):
    # Without the hook the encoder's LoRA weights get no gradient at all (silently frozen).
    assert _encoder_lora_grads(tiny_model_dir, hook=False) == 0
    assert _encoder_lora_grads(tiny_model_dir, hook=True) == 2 * 2 * 2  # 2 layers x q,v x A,B


@pytest.mark.parametrize("quantization", ["none", "int8"])
def test_prepared_model_trains_encoder_lora_with_checkpointing(tiny_model_dir, quantization):
    base = M.load_base(str(tiny_model_dir), quantization, "fp32")
    model = L.apply_lora(L.prepare_for_training(base, quantization, True), LoraSection(r=2, alpha=4))
    model.train()
    out = model(input_features=torch.randn(1, 80, 3000), labels=torch.tensor([[50259, 50359, 400, 50257]]))
    out.loss.backward()
    grads = [n for n, p in model.named_parameters() if "lora_B" in n and p.grad is not None and p.grad.abs().sum() > 0]
    # encoder: 2 layers x (q, v); decoder: 2 layers x (self q, v + cross q, v)
    assert sum(".encoder.layers" in n for n in grads) == 4 and sum(".decoder.layers" in n for n in grads) == 8
    assert not any(p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)


def test_int8_checkpointing_gives_the_same_gradients_as_no_checkpointing(tiny_model_dir):
    """int8 uses reentrant checkpointing (bitsandbytes stashes its inputs out of reach of the
    non-reentrant kind, see prepare_for_training): it must not change what LoRA learns."""
    x = torch.randn(2, 80, 3000)
    labels = torch.tensor([[50259, 50359, 400, 401, 50257]] * 2)
    grads = []
    for ckpt in (False, True):
        base = M.load_base(str(tiny_model_dir), "int8", "fp32")
        torch.manual_seed(0)
        model = L.apply_lora(L.prepare_for_training(base, "int8", ckpt), LoraSection(r=2, alpha=4, dropout=0.0))
        model.train()
        model(input_features=x, labels=labels).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if "lora_B" in n})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 12
    for n in grads[0]:
        assert torch.allclose(grads[0][n], grads[1][n], rtol=1e-4, atol=1e-6), n
    assert any(".encoder.layers" in n and g.abs().sum() > 0 for n, g in grads[1].items())


def test_lora_weights_stay_fp32_on_a_half_precision_base(tiny_model_dir):
    """The optimizer steps only LoRA weights: PEFT keeps them fp32 even when the frozen base
    is half precision (int8/nf4 compute dtype, or a bf16 base), so fp16 AMP's scaler works."""
    import torch
    from transformers import WhisperForConditionalGeneration

    from lib.train import lora as L
    from lib.train.config import LoraSection

    base = WhisperForConditionalGeneration.from_pretrained(tiny_model_dir, dtype=torch.bfloat16)
    model = L.apply_lora(L.prepare_for_training(base, "none", True), LoraSection(r=4, alpha=8))
    trainable = {p.dtype for p in model.parameters() if p.requires_grad}
    frozen = {p.dtype for p in model.parameters() if not p.requires_grad}
    assert trainable == {torch.float32} and frozen == {torch.bfloat16}


def test_half_precision_base_trains_from_fp32_features(tiny_model_dir):
    """model.base_dtype=compute: a bf16 base fed the collator's fp32 log-mel must run and give
    LoRA gradients, with or without autocast (on an H100 conv1 failed before the cast hook)."""
    import numpy as np
    import torch
    from transformers import WhisperProcessor

    from lib.train import lora as L
    from lib.train.collator import WhisperCollator
    from lib.train.config import LoraSection

    base = M.load_base(str(tiny_model_dir), "none", "bf16", base_dtype="compute")
    assert base.model.encoder.conv1.weight.dtype == torch.bfloat16
    model = L.apply_lora(L.prepare_for_training(base, "none", True), LoraSection(r=4, alpha=8))
    proc = WhisperProcessor.from_pretrained(tiny_model_dir)
    collate = WhisperCollator(proc.feature_extractor, base.config.decoder_start_token_id)
    rng = np.random.default_rng(0)
    batch = collate([{"audio": rng.standard_normal(16_000).astype(np.float32) * 0.1,
                      "labels": [50258, 50276, 50359, 50363, 1000 + i, 50257]} for i in range(2)])
    assert batch["input_features"].dtype == torch.float32
    model.train()
    for autocast in (False, True):
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = model(**batch).loss
        loss.backward()
        grads = [p.grad for n, p in model.named_parameters() if "lora_B" in n]
        assert torch.isfinite(loss) and grads and all(g is not None for g in grads)
        assert any(g.abs().sum() > 0 for g in grads)


def test_int8_layers_get_half_inputs_and_the_same_gradients(tiny_model_dir):
    """Issue 14 target 4: the 8-bit layers' input is cast to fp16 in front of them, so that
    bitsandbytes' backward multiplies in fp16 rather than fp32; the LoRA gradients stay those
    of the uncast run (bitsandbytes cast to fp16 in forward already). The loss is scaled as
    the Trainer's fp16 GradScaler does: unscaled, the encoder's input gradients (~1e-6)
    underflow in fp16, which is why the cast is for half-precision runs only."""
    import bitsandbytes as bnb

    from lib.train.config import LoraSection

    scale = 2.0**16
    grads, seen = [], []
    for dtype in (None, torch.float16):
        torch.manual_seed(0)
        base = M.load_base(str(tiny_model_dir), "int8", "fp32")
        base = L.prepare_for_training(base, "int8", False, 1.0, int8_input_dtype=dtype)
        model = L.apply_lora(base, LoraSection(r=4, alpha=8, dropout=0.0))
        for n, p in model.named_parameters():
            if "lora_B" in n:
                torch.nn.init.normal_(p, std=0.02, generator=torch.Generator().manual_seed(len(n)))
        layer = next(m for m in model.modules() if isinstance(m, bnb.nn.Linear8bitLt))
        layer.register_forward_pre_hook(lambda m, a, dtype=dtype: seen.append((dtype, a[0].dtype)))
        torch.manual_seed(1)
        model.train()
        loss = model(input_features=torch.randn(2, 80, 3000), labels=torch.randint(0, 50_000, (2, 6))).loss
        (loss * scale).backward()
        grads.append({n: p.grad / scale for n, p in model.named_parameters() if p.grad is not None})
    assert (None, torch.float32) in seen and (torch.float16, torch.float16) in seen
    assert grads[0].keys() == grads[1].keys() and any("encoder" in n for n in grads[0])
    for n in grads[0]:
        a, b = grads[0][n], grads[1][n]
        assert ((a - b).norm() / a.norm()).item() < 0.05, n


def test_random_weight_models_say_so_in_their_config(tiny_model_dir):
    """lib/tools/models.py marks what it builds; eval and train read the mark (lib.model.has_random_weights)."""
    from transformers import AutoConfig

    assert json.loads((tiny_model_dir / "config.json").read_text())[M.RANDOM_WEIGHTS] is True
    cfg = AutoConfig.from_pretrained(tiny_model_dir)
    holder = type("Model", (), {"config": cfg})()
    assert M.has_random_weights(holder) and "mean nothing" in M.random_weights_note(holder)
    del cfg.random_weights  # a released (trained) Whisper's config has no such key
    assert not M.has_random_weights(holder) and M.random_weights_note(holder) is None


def _timestamp_writer(tiny_model_dir):
    """The tiny model rigged to write <|0.00|> whatever it hears (a fine-tune on timestamped or
    packed windows can write timestamps after <|notimestamps|>)."""
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    model = WhisperForConditionalGeneration.from_pretrained(tiny_model_dir).eval()
    processor = WhisperProcessor.from_pretrained(tiny_model_dir)
    ts = processor.tokenizer.convert_tokens_to_ids("<|0.00|>")
    with torch.no_grad():
        norm = model.model.decoder.layer_norm
        norm.weight.zero_()
        bias = torch.randn(norm.bias.shape, generator=torch.Generator().manual_seed(0))
        norm.bias.copy_(bias)  # every position's hidden state is `bias`, so its logits are fixed...
        model.proj_out.weight[ts] = 50 * bias / bias.norm()  # ...and <|0.00|> wins them all
    return model, processor, ts


@pytest.mark.timeout(120)
def test_a_model_that_writes_timestamps_after_notimestamps_decodes_each_clip_once(tiny_model_dir):
    """Whisper's generate() seeks to the last of two timestamp tokens and decodes the rest of the
    clip again: `<|0.00|><|0.00|>` seeks by 0 frames, for ever (the Trainer's eval after packed
    training hung so on an H100). lib.inference.ONE_WINDOW: one pass per clip, prompt stripped."""
    import numpy as np

    from lib.inference import decode_batch

    model, processor, ts = _timestamp_writer(tiny_model_dir)
    clips = [np.zeros(16_000, np.float32), 0.1 * np.ones(8_000, np.float32)]
    out = decode_batch(model, processor, clips, "hi", "transcribe", max_new_tokens=8)
    assert out.truncated == [True, True] and out.texts == ["", ""]  # 8 timestamp tokens each, no <|endoftext|>
    # the same through the Trainer's evaluation kwargs
    from lib.train.trainer import corpus_trainer

    seen = {}

    def capture(self, eval_dataset=None, ignore_keys=None, metric_key_prefix="eval", **gen_kwargs):
        seen.update(gen_kwargs)
        return {}

    trainer_cls = corpus_trainer()
    base = trainer_cls.__mro__[1]
    original = base.evaluate
    try:
        base.evaluate = capture
        t = trainer_cls.__new__(trainer_cls)
        t.eval_languages = {}
        t.evaluate()
    finally:
        base.evaluate = original
    assert seen.get("force_unique_generate_call") is True
    feats = processor.feature_extractor(clips[:1], sampling_rate=16_000, return_tensors="pt").input_features
    tokens = model.generate(input_features=feats, language="hi", task="transcribe", max_new_tokens=8, **seen)
    assert (tokens[0, -8:] == ts).all()
