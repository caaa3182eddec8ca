"""The export job: merge into a float base, verification that catches a bad merge, CTranslate2, Hub push."""

from __future__ import annotations

import json

import pytest
import torch

from lib.env import Env
from lib.errors import UserError
from tests.helpers import make_run, tone


class FakeHfApi:
    """Stands in for huggingface_hub.HfApi at the network boundary; records what was asked."""

    calls: list = []

    def __init__(self, token=None):
        self.token = token

    def create_repo(self, repo_id, **kw):
        FakeHfApi.calls.append(("create_repo", repo_id, kw))
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, repo_id, folder_path, **kw):
        from pathlib import Path

        FakeHfApi.calls.append(("upload_folder", repo_id, sorted(p.name for p in Path(folder_path).iterdir())))


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_model_dir):
    """One full export of a fabricated run: merged fp32 + CTranslate2 + a (fake) Hub push.

    CTranslate2 float16 here (run as float32 on the CPU): int8 on a random-weight model flips
    near-tied tokens, which says nothing about a trained model; int8 is checked in the slow test."""
    import huggingface_hub

    from jobs.export import ExportConfig, main
    from lib.hub import HubConfig

    data_dir = tmp_path_factory.mktemp("data")
    make_run(data_dir, tiny_model_dir)
    eval_dir = data_dir / "runs" / "tiny-run" / "eval"
    eval_dir.mkdir()
    (eval_dir / "report.md").write_text("# Evaluation: tiny\n\n| metric | adapter |\n|---|---|\n| WER | 12.00 % |\n")
    mp = pytest.MonkeyPatch()
    mp.setattr(huggingface_hub, "HfApi", FakeHfApi)
    FakeHfApi.calls.clear()
    try:
        manifest = main(ExportConfig(run="tiny-run", dtype="fp32", ctranslate2="float16", verify_clips=3, verify_tokens=16,
                                     hub=HubConfig(push=True, repo_id="me/whisper-tiny-hi")),
                        Env(data_dir=data_dir, hf_token="hf_fake_token"))
    finally:
        mp.undo()
    return data_dir, manifest


def test_export_writes_a_standalone_verified_model(exported):
    data_dir, manifest = exported
    out = data_dir / "runs" / "tiny-run" / "merged"
    assert {"config.json", "model.safetensors", "generation_config.json", "preprocessor_config.json",
            "tokenizer.json", "export.json", "README.md"} <= {p.name for p in out.iterdir()}
    assert not list(out.parent.glob(".*incomplete"))
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["language"] == "hi" and gen["task"] == "transcribe"
    v = manifest["verify"]
    assert v["passed"] and v["clips"] == 3 and v["identical"] == 3 and v["max_relative_logit_diff"] < 1e-3
    assert json.loads((out / "export.json").read_text())["fingerprint"] == manifest["fingerprint"]


def test_merged_model_loads_with_plain_pipeline(exported):
    from transformers import pipeline

    data_dir, _ = exported
    asr = pipeline("automatic-speech-recognition", model=str(data_dir / "runs" / "tiny-run" / "merged"),
                   device="cpu")
    text = asr({"raw": tone(1.0, 300), "sampling_rate": 16_000}, generate_kwargs={"max_new_tokens": 8})["text"]
    assert isinstance(text, str) and text.strip()


def test_merge_then_reload_matches_base_plus_adapter_logits(exported, tiny_model_dir):
    from peft import PeftModel
    from transformers import WhisperForConditionalGeneration

    data_dir, _ = exported
    run = data_dir / "runs" / "tiny-run"
    merged = WhisperForConditionalGeneration.from_pretrained(run / "merged").eval()
    base = WhisperForConditionalGeneration.from_pretrained(tiny_model_dir).eval()
    ref = PeftModel.from_pretrained(base, run / "adapter").eval()
    feats = torch.randn(1, 80, 3000)
    ids = torch.tensor([[50258, 50276, 50359, 50363, 400, 401]])
    with torch.no_grad():
        a = ref(input_features=feats, decoder_input_ids=ids).logits
        b = merged(input_features=feats, decoder_input_ids=ids).logits
        with ref.disable_adapter():
            plain = ref(input_features=feats, decoder_input_ids=ids).logits
    assert torch.allclose(a, b, atol=1e-4)
    assert (a - plain).abs().max() > 1e-2  # the adapter is not a no-op, so the check means something


def test_ctranslate2_export_is_checked(exported):
    data_dir, manifest = exported
    ct2 = data_dir / "runs" / "tiny-run" / "merged-ct2-float16"
    assert {"model.bin", "config.json", "tokenizer.json", "preprocessor_config.json"} <= {p.name for p in ct2.iterdir()}
    c = manifest["ctranslate2"]
    assert c["passed"] and c["clips"] == 3 and c["compute_type"] == "float32" and c["wer_vs_merged"] <= 0.25


def test_hub_push_uploads_with_model_card(exported):
    data_dir, manifest = exported
    assert FakeHfApi.calls[0][:2] == ("create_repo", "me/whisper-tiny-hi")
    assert FakeHfApi.calls[0][2]["private"] is True
    assert FakeHfApi.calls[1][0] == "upload_folder" and "README.md" in FakeHfApi.calls[1][2]
    card = (data_dir / "runs" / "tiny-run" / "merged" / "README.md").read_text()
    assert "pipeline_tag: automatic-speech-recognition" in card and "12.00 %" in card
    assert "hf_fake_token" not in card and "hf_fake_token" not in json.dumps(manifest)


def test_verification_fails_for_a_corrupted_merge(exported, tmp_path):
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    from lib.export.merge import verify_merged
    from lib.model import ModelSource

    data_dir, _ = exported
    run = data_dir / "runs" / "tiny-run"
    bad = WhisperForConditionalGeneration.from_pretrained(run / "merged")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a merge that went wrong: the decoder's q_proj updates scrambled
        for layer in bad.model.decoder.layers:
            w = layer.self_attn.q_proj.weight
            w.copy_(w + torch.randn(w.shape, generator=g) * 0.5)
    bad.save_pretrained(tmp_path / "bad")
    WhisperProcessor.from_pretrained(run / "merged").save_pretrained(tmp_path / "bad")
    source = ModelSource(base=str(json.loads((run / "adapter" / "adapter_config.json").read_text())
                                  ["base_model_name_or_path"]), adapter=str(run / "adapter"))
    clips = [tone(1.0, 300), tone(0.7, 500)]
    with pytest.raises(UserError, match="verification FAILED"):
        verify_merged(source, tmp_path / "bad", clips, "hi", "transcribe", "fp32", max_wer=0.05, max_new_tokens=16)
    # ...while the good one passes the same call.
    assert verify_merged(source, run / "merged", clips, "hi", "transcribe", "fp32", max_wer=0.0,
                         max_new_tokens=16)["passed"]


def test_export_never_overwrites_another_model(exported):
    from jobs.export import ExportConfig, main

    data_dir, _ = exported
    other = data_dir / "elsewhere"
    other.mkdir()
    (other / "config.json").write_text("{}")
    with pytest.raises(UserError, match="force=true"):
        main(ExportConfig(run="tiny-run", out=str(other)), Env(data_dir=data_dir))
    # a different dtype is a different model too
    with pytest.raises(UserError, match="different export.*force=true"):
        main(ExportConfig(run="tiny-run", dtype="fp16"), Env(data_dir=data_dir))


def test_merge_refuses_a_quantized_base_and_shows_why(tiny_model_dir, tmp_path):
    """Merging into 8-bit weights rounds the LoRA update away; lib.export.merge merges into float only."""
    from bitsandbytes.functional import int8_vectorwise_dequant, int8_vectorwise_quant
    from transformers import BitsAndBytesConfig, WhisperForConditionalGeneration

    from lib.export.merge import merge_into
    from tests.helpers import make_adapter

    adapter = make_adapter(tiny_model_dir, tmp_path / "adapter")
    q = WhisperForConditionalGeneration.from_pretrained(
        tiny_model_dir, quantization_config=BitsAndBytesConfig(load_in_8bit=True), device_map={"": "cpu"})
    with pytest.raises(UserError, match="quantized"):
        merge_into(q, str(adapter), str(tiny_model_dir))
    # The arithmetic: a typical small LoRA update (1e-3 of the weight scale) added to a weight
    # and re-quantized to int8 (per-row absmax / 127) mostly vanishes; in float it survives.
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 64, generator=g) * 0.02
    delta = torch.randn(64, 64, generator=g) * 2e-5
    qw, scale = int8_vectorwise_quant((w + delta).half())[:2]
    kept_8bit = (int8_vectorwise_dequant(qw, scale).float() - int8_vectorwise_dequant(
        *int8_vectorwise_quant(w.half())[:2]).float())
    kept_float = (w + delta) - w
    err_8bit = float((kept_8bit - delta).norm() / delta.norm())
    err_float = float((kept_float - delta).norm() / delta.norm())
    assert err_float < 1e-3 and err_8bit > 0.5


def test_adapter_on_the_wrong_base_names_model(exported, tmp_path):
    from jobs.export import ExportConfig, main
    from tests.helpers import build_tiny_whisper

    data_dir, _ = exported
    wider = build_tiny_whisper(tmp_path / "wider", d_model=96, encoder_ffn_dim=96, decoder_ffn_dim=96)
    with pytest.raises(UserError, match=r"does not fit model=.*set model= to that base"):
        main(ExportConfig(run="tiny-run", model=str(wider), out=str(tmp_path / "o")), Env(data_dir=data_dir))


def test_missing_paths_are_clear(tmp_path):
    from jobs.export import ExportConfig, main

    with pytest.raises(UserError, match="run=nope"):
        main(ExportConfig(run="nope"), Env(data_dir=tmp_path))
    with pytest.raises(UserError, match="adapter=.*no such folder"):
        main(ExportConfig(adapter=str(tmp_path / "missing")), Env(data_dir=tmp_path))
