"""Speed knobs of the train job on a tiny Whisper: profiling, partial checkpointing, compiled layers."""

import functools
import json

import pytest
import torch

from jobs.train import main
from lib.env import Env
from lib.errors import UserError
from lib.train import lora as L
from tests.helpers import lora_weights
from tests.helpers import train_cfg as cfg


def test_profile_writes_where_the_time_goes_and_is_not_timed(data_dir, tiny_model_dir):
    metrics = main(cfg(tiny_model_dir, "prof", **{"train.profile_steps": 2, "train.timing_warmup": 2,
                                                  "train.eval_steps": 6, "train.save_steps": 6}),
                   Env(data_dir=data_dir))
    prof = metrics["profile"]
    assert prof["steps"] == 2 and prof["wall_s"] > 0 and 0 < prof["busy_s"]
    assert prof["seconds_by_kind"]["matmul"] > 0  # the linear layers were seen
    assert set(prof["seconds_by_kind"]) <= {"matmul", "attention", "other", "copy"}
    # 6 steps, warm-up 2, the last 2 profiled: steps 3 and 4 are timed
    assert metrics["steady_steps"] == 2
    text = (data_dir / "runs" / "prof" / "profile.txt").read_text()
    assert "profile of 2 optimizer steps" in text and "| matmul |" in text


def test_profile_steps_must_leave_steps_to_train(tiny_model_dir):
    with pytest.raises(UserError, match="train.profile_steps=6"):
        cfg(tiny_model_dir, "x", **{"train.profile_steps": 6})


def _checkpointed(model) -> list[list[bool]]:
    w = model.model
    return [[bool(layer.gradient_checkpointing) for layer in stack] for stack in (w.encoder.layers, w.decoder.layers)]


def test_checkpoint_fraction_picks_evenly_spaced_layers(tiny_model_dir):
    from transformers import WhisperForConditionalGeneration

    for fraction, expect in ((1.0, [True, True]), (0.5, [False, True])):
        m = WhisperForConditionalGeneration.from_pretrained(tiny_model_dir)
        L.prepare_for_training(m, "none", True, fraction)
        assert _checkpointed(m) == [expect, expect]
    m = WhisperForConditionalGeneration.from_pretrained(tiny_model_dir)
    L.prepare_for_training(m, "none", False, 0.5)
    assert _checkpointed(m) == [[False, False], [False, False]]
    # 32 layers at 0.75: 24 checkpointed, never two un-checkpointed in a row
    keep = [int((i + 1) * 0.75) > int(i * 0.75) for i in range(32)]
    assert sum(keep) == 24 and "FalseFalse" not in "".join(map(str, keep))


def test_checkpoint_fraction_must_be_a_share(tiny_model_dir):
    with pytest.raises(UserError, match="model.checkpoint_fraction=0"):
        cfg(tiny_model_dir, "x", **{"model.checkpoint_fraction": 0})


def test_partial_checkpointing_trains_like_full(even_data_dir, tiny_model_dir):
    """Checkpointing only changes what is kept in memory: same LoRA weights after training."""
    data_dir = even_data_dir  # training alone is compared: no validation split, nothing to generate
    env = Env(data_dir=data_dir)
    common = {"model.gradient_checkpointing": "true", "lora.dropout": 0.0, "train.max_steps": 3,
              "train.eval_steps": 3, "train.save_steps": 3}
    main(cfg(tiny_model_dir, "ck-all", **common), env)
    main(cfg(tiny_model_dir, "ck-half", **common, **{"model.checkpoint_fraction": 0.5}), env)
    a, b = (lora_weights(data_dir / "runs" / r / "adapter") for r in ("ck-all", "ck-half"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)


@pytest.mark.parametrize("ckpt", ["false", "true"])
def test_compiled_layers_train_like_eager(even_data_dir, tiny_model_dir, ckpt):
    """train.compile=layers: the same function, so the same loss curve (float rounding apart);
    with checkpointing, the checkpoint stays outside the compiled body. On labels of one length and
    without a validation split: the layers compile once, not again per label length and for generation."""
    data_dir = even_data_dir
    env = Env(data_dir=data_dir)
    common = {"lora.dropout": 0.0, "train.max_steps": 3, "train.eval_steps": 3, "train.save_steps": 3,
              "train.logging_steps": 1, "model.gradient_checkpointing": ckpt}
    main(cfg(tiny_model_dir, f"eager-{ckpt}", **common), env)
    main(cfg(tiny_model_dir, f"compiled-{ckpt}", **common, **{"train.compile": "layers"}), env)
    losses = [[h["loss"] for h in json.loads((data_dir / "runs" / r / "log_history.json").read_text()) if "loss" in h]
              for r in (f"eager-{ckpt}", f"compiled-{ckpt}")]
    assert len(losses[0]) == 3
    assert losses[1] == pytest.approx(losses[0], rel=1e-4)
    # the adapter a compiled run saves is the same file an eager run saves (no _orig_mod. prefixes)
    a, b = (lora_weights(data_dir / "runs" / r / "adapter") for r in (f"eager-{ckpt}", f"compiled-{ckpt}"))
    assert a.keys() == b.keys()


def test_int8_compiled_checkpointed_layers_train_like_eager(tiny_model_dir):
    """int8 uses reentrant checkpointing, which refused the layers' keyword arguments
    ("Unexpected keyword arguments: use_cache") on the first step of train.compile=layers; and
    reentrant checkpointing only passes gradients to positional tensors: with the layers
    compiled, every LoRA weight (the encoder's too, reached through the cross-attention)
    must get the same gradient as in eager mode. One forward + backward on the real
    bitsandbytes int8 CPU path and a real torch.compile (about 40 s on 2 busy cores)."""
    from lib.train.config import LoraSection

    grads = []
    for compiled in (False, True):
        torch.manual_seed(0)
        from lib.model import load_base

        base = load_base(str(tiny_model_dir), "int8", "fp32", "fp32")
        base = L.prepare_for_training(base, "int8", True, 1.0)
        model = L.apply_lora(base, LoraSection(r=4, alpha=8, dropout=0.0))
        for n, p in model.named_parameters():
            if "lora_B" in n:  # PEFT starts lora_B at 0, which would leave lora_A without a gradient
                torch.nn.init.normal_(p, std=0.02, generator=torch.Generator().manual_seed(len(n)))
        if compiled:
            assert L.compile_layers(model) == 4
        model.train()
        torch.manual_seed(1)
        out = model(input_features=torch.randn(2, 80, 3000), labels=torch.tensor([[50258, 50259, 50359, 50257]] * 2))
        out.loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    eager, comp = grads
    assert eager.keys() == comp.keys() and len(eager) == 24
    assert any("encoder" in n for n in comp)
    for n in eager:
        assert comp[n].abs().sum() > 0, f"{n}: no gradient through the compiled, checkpointed layer"
        torch.testing.assert_close(comp[n], eager[n], rtol=1e-3, atol=1e-6, msg=n)


def test_compiled_checkpointed_layer_recomputes_its_body(tiny_model_dir):
    """The compiled body runs twice per step in a checkpointed layer (forward, then recompute
    in backward) and once without checkpointing: checkpointing still saves memory."""
    from transformers import WhisperForConditionalGeneration

    for ckpt, calls in ((True, 2), (False, 1)):
        m = WhisperForConditionalGeneration.from_pretrained(tiny_model_dir)
        L.prepare_for_training(m, "none", ckpt)
        layer = m.model.encoder.layers[0]
        L.compile_layers(m)
        m.train()
        seen: list[int] = []
        if ckpt:
            compiled = layer.forward.args[1]  # forward = partial(_checkpoint_compiled, layer, compiled body)

            def counted(*a, seen=seen, compiled=compiled, **k):
                seen.append(1)
                return compiled(*a, **k)

            layer.forward = functools.partial(L._checkpoint_compiled, layer, counted)
        else:
            layer.register_forward_hook(lambda *a, seen=seen: seen.append(1))
        feats = torch.randn(1, 80, 3000, requires_grad=False)
        out = m(input_features=feats, labels=torch.tensor([[50258, 50259, 50257]]))
        out.loss.backward()
        assert len(seen) == calls


@pytest.fixture
def fresh_log_once(monkeypatch):
    """bitsandbytes' logger without lib.model's log-once filter: the filter stays on the logger for
    the process, so an int8 run earlier in the same pytest process (another test, another file under
    `make test`'s workers) has already let its one message through."""
    import logging

    from lib.model import _Once

    lg = logging.getLogger("bitsandbytes.autograd._functions")
    monkeypatch.setattr(lg, "filters", [f for f in lg.filters if not isinstance(f, _Once)])


def test_bitsandbytes_cast_warning_is_logged_once(data_dir, tiny_model_dir, caplog, fresh_log_once):
    """bitsandbytes logs its fp32->fp16 cast on every 8-bit matmul call; the run's log gets it once.
    Training feeds the 8-bit layers fp16 already (lib/train/lora.py): the casts come from the
    evaluation's generation, so this run needs data_dir's validation split."""
    import logging

    with caplog.at_level(logging.WARNING):
        main(cfg(tiny_model_dir, "int8-log", **{"model.quantization": "int8", "train.max_steps": 2,
                                                "train.eval_steps": 2, "train.save_steps": 2}),
             Env(data_dir=data_dir))
    casts = [r for r in caplog.records if "MatMul8bitLt" in r.getMessage()]
    assert len(casts) == 1 and "repeats dropped" in casts[0].getMessage()


def test_compile_without_a_c_compiler_is_a_clear_error(data_dir, tiny_model_dir, monkeypatch):
    import shutil

    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(UserError, match="train.compile=layers needs a C compiler.*train.compile=none"):
        main(cfg(tiny_model_dir, "no-cc", **{"train.compile": "layers"}), Env(data_dir=data_dir))
