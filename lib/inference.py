"""Load a Whisper for inference (base, base + LoRA adapter, or a merged model) and transcribe in batches.

Where the model comes from, in the words of the eval/export/transcribe flags:
  run=NAME            DATA_DIR/runs/NAME/adapter, on the base named in its adapter_config.json
                      (or model=, which must then have the same shapes);
  adapter=DIR|HUB_ID  a PEFT LoRA adapter, on its own base or on model=;
  model=DIR|HUB_ID    a plain or merged Whisper, no adapter.

Language and task are always forced at generation (`generate(language=, task=)`), never
left to Whisper's language detection: a fine-tuned Hindi model asked to detect the
language of a short clip sometimes answers Urdu and transcribes in the wrong script.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from lib.errors import UserError

log = logging.getLogger("whisper_ft")

Precision = Literal["auto", "fp32", "fp16", "bf16"]
Quantization = Literal["none", "int8"]
SAMPLING_RATE = 16_000
CLIP_SECONDS = 30  # Whisper's encoder sees 30-s windows: 30 s x 100 frames/s = 3000 mel frames


@dataclass
class ModelSource:
    """What to load: a base model, optionally an adapter, and what the run folder says."""

    base: str
    adapter: str | None = None
    run_dir: Path | None = None
    run_config: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> str:
        return f"{self.base} + adapter {self.adapter}" if self.adapter else self.base


def _is_local(name: str) -> bool:
    return Path(name).exists() or name.startswith(("/", "./", "../", "~"))


def _adapter_config(adapter: str) -> dict[str, Any]:
    """adapter_config.json of a local folder or a Hub id (the Hub only when it is reachable)."""
    if _is_local(adapter):
        path = Path(adapter).expanduser()
        if not path.is_dir():
            raise UserError(f"adapter={adapter}: no such folder")
        cfg = path / "adapter_config.json"
        if not cfg.is_file():
            if (path / "config.json").is_file():
                raise UserError(
                    f"adapter={adapter} holds a full model (config.json), not a LoRA adapter: "
                    f"pass it as model={adapter} instead"
                )
            raise UserError(f"adapter={adapter}: no adapter_config.json; is this the run's adapter/ folder?")
        return json.loads(cfg.read_text())
    from huggingface_hub import hf_hub_download

    try:
        return json.loads(Path(hf_hub_download(adapter, "adapter_config.json")).read_text())
    except Exception as e:  # offline, missing repo, gated: all need the same fix
        raise UserError(f"adapter={adapter}: cannot read adapter_config.json from the Hub ({e})") from None


def resolve_source(env, run: str | None = None, model: str | None = None,
                   adapter: str | None = None) -> ModelSource:
    """Turn run= / model= / adapter= into a ModelSource; errors name the flag to fix."""
    import yaml

    if run and adapter:
        raise UserError("give run= or adapter=, not both (run=NAME already means DATA_DIR/runs/NAME/adapter)")
    if not (run or model or adapter):
        raise UserError("nothing to load: set run=NAME, or model=DIR|HUB_ID, or adapter=DIR|HUB_ID")
    run_dir, run_config = None, {}
    if run:
        run_dir = env.run_dir(run)
        if not run_dir.is_dir():
            runs = sorted(p.name for p in run_dir.parent.iterdir()) if run_dir.parent.is_dir() else []
            raise UserError(f"run={run}: {run_dir} does not exist (runs: {', '.join(runs) or 'none yet'})")
        if not (run_dir / "adapter" / "adapter_config.json").is_file():
            raise UserError(
                f"run={run}: {run_dir}/adapter/adapter_config.json missing: the run has not finished; "
                f"wait for `make train`, or pass adapter=<a checkpoint folder>"
            )
        adapter = str(run_dir / "adapter")
        if (run_dir / "config.yaml").is_file():
            run_config = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
    if model and _is_local(model) and not Path(model).expanduser().is_dir():
        raise UserError(f"model={model}: no such folder (give a model folder or a Hub id like openai/whisper-small)")
    if adapter:
        acfg = _adapter_config(adapter)
        base = model or acfg.get("base_model_name_or_path")
        if not base:
            raise UserError(f"adapter={adapter}: adapter_config.json names no base model: set model=")
        if not model and _is_local(base) and not Path(base).is_dir():
            raise UserError(
                f"the adapter's base {base} (adapter_config.json base_model_name_or_path) is not here: "
                f"set model= to that base model's folder or Hub id"
            )
        return ModelSource(base=str(base), adapter=str(adapter), run_dir=run_dir, run_config=run_config)
    return ModelSource(base=str(model), run_dir=run_dir, run_config=run_config)


def check_adapter_matches(adapter: str, base_model, base_name: str) -> None:
    """Refuse an adapter whose LoRA shapes do not fit the base (trained on another model size).

    LoRA A is (r, in_features) and B is (out_features, r) of the module it wraps; a
    whisper-small adapter (d_model 768) on whisper-base (512) fails here with a message
    instead of a 40-line size-mismatch traceback from load_state_dict.
    """
    from safetensors import safe_open

    declared = _adapter_config(adapter).get("base_model_name_or_path")
    path = Path(adapter) / "adapter_model.safetensors"
    if not path.is_file():
        if _is_local(adapter):
            raise UserError(f"adapter={adapter}: adapter_model.safetensors missing")
        return  # a Hub adapter: peft downloads and shape-checks it
    modules = dict(base_model.named_modules())
    problems = []
    with safe_open(str(path), "pt") as f:
        for key in f.keys():
            if ".lora_A." not in key and ".lora_B." not in key:
                continue
            name = key.split(".lora_")[0].removeprefix("base_model.model.")
            mod = modules.get(name)
            shape = tuple(f.get_slice(key).get_shape())
            if mod is None or not hasattr(mod, "in_features"):
                problems.append(f"{name} not in the base")
            elif ".lora_A." in key and shape[1] != mod.in_features:
                problems.append(f"{name}: adapter in_features {shape[1]}, base {mod.in_features}")
            elif ".lora_B." in key and shape[0] != mod.out_features:
                problems.append(f"{name}: adapter out_features {shape[0]}, base {mod.out_features}")
    if problems:
        raise UserError(
            f"adapter {adapter} does not fit model={base_name} ({len(problems)} mismatches, e.g. "
            f"{problems[0]}); the adapter was trained on {declared!r} (adapter_config.json "
            f"base_model_name_or_path): set model= to that base"
        )
    if declared and Path(str(declared)).name != Path(base_name).name:
        log.warning("adapter says its base is %s, loading it on %s (shapes match)", declared, base_name)


def pick_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_dtype(precision: Precision, device: str):
    """auto: bf16 on GPUs that have it (Ampere+), else fp16 on GPU; fp32 on CPU (fp16 matmuls
    on CPU are slow and some kernels are missing)."""
    import torch

    if precision == "auto":
        if device == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
        return torch.float32
    if device == "cpu" and precision == "fp16":
        raise UserError("precision=fp16 needs a GPU; on the CPU use precision=fp32 (or auto)")
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]


def load_processor(source: ModelSource):
    """The adapter folder's processor when it has one (the run saved it), else the base's."""
    from transformers import WhisperProcessor

    errors = []
    for where in ([source.adapter] if source.adapter else []) + [source.base]:
        if _is_local(where) and not (Path(where) / "tokenizer_config.json").is_file():
            errors.append(f"{where}: no tokenizer_config.json")
            continue
        try:
            return WhisperProcessor.from_pretrained(where)
        except OSError as e:
            errors.append(f"{where}: {e}")
    raise UserError(f"no Whisper processor (tokenizer + feature extractor) found: {'; '.join(errors)}")


def load_base(name: str, dtype, quantization: Quantization = "none", device: str = "cpu"):
    """A WhisperForConditionalGeneration in `dtype`, or 8-bit through bitsandbytes when asked."""
    from transformers import WhisperForConditionalGeneration

    kwargs: dict[str, Any] = {"dtype": dtype}
    if quantization == "int8":
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
        kwargs["device_map"] = {"": device if device != "cuda" else 0}
    try:
        model = WhisperForConditionalGeneration.from_pretrained(name, **kwargs)
    except OSError as e:
        raise UserError(f"model={name}: cannot load a Whisper model ({e})") from None
    if quantization == "none":
        model.to(device)
    return model.eval()


def load_model(source: ModelSource, precision: Precision = "auto", quantization: Quantization = "none",
               device: str | None = None):
    """(model, processor, info): the base with the adapter attached (PeftModel) or the plain model."""
    device = device or pick_device()
    dtype = resolve_dtype(precision, device)
    model = load_base(source.base, dtype, quantization, device)
    if source.adapter:
        from peft import PeftModel

        check_adapter_matches(source.adapter, model, source.base)
        model = PeftModel.from_pretrained(model, source.adapter, is_trainable=False).eval()
    info = {"device": device, "dtype": str(dtype).removeprefix("torch."), "quantization": quantization}
    return model, load_processor(source), info


def default_language_task(source: ModelSource, model) -> tuple[str | None, str | None]:
    """What the run says, else the adapter's generation_config.json, else the model's."""
    lang, task = source.run_config.get("language"), source.run_config.get("task")
    gen_file = Path(source.adapter) / "generation_config.json" if source.adapter else None
    if gen_file is not None and gen_file.is_file():
        gen = json.loads(gen_file.read_text())
        lang, task = lang or gen.get("language"), task or gen.get("task")
    gen = getattr(model, "generation_config", None)
    lang = lang or getattr(gen, "language", None)
    task = task or getattr(gen, "task", None)
    if isinstance(lang, str):
        lang = lang.strip("<|>")
    return lang, task


def check_language(language: str | None, model) -> str:
    """A language code Whisper knows ("hi"); full names ("hindi") become codes."""
    from transformers.models.whisper.tokenization_whisper import LANGUAGES, TO_LANGUAGE_CODE

    if not language:
        raise UserError("language is not set and the run/dataset does not say it: set language=hi (an ISO code)")
    code = language.lower()
    code = TO_LANGUAGE_CODE.get(code, code)
    if code not in LANGUAGES:
        raise UserError(f"language={language} is not a Whisper language; use an ISO code such as hi, en, ta, bn")
    lang_to_id = getattr(model.generation_config, "lang_to_id", None) or {}
    if lang_to_id and f"<|{code}|>" not in lang_to_id:
        raise UserError(f"language={code} is not in this model's generation_config.json lang_to_id")
    return code


def features_for(processor, audios: Sequence[np.ndarray], dtype, device):
    feats = processor.feature_extractor(
        [np.asarray(a, dtype=np.float32) for a in audios], sampling_rate=SAMPLING_RATE, return_tensors="pt"
    ).input_features
    return feats.to(device=device, dtype=dtype)


def _model_dtype(model):
    import torch

    for p in model.parameters():
        if p.dtype.is_floating_point and p.dtype != torch.float32:
            return p.dtype
    return torch.float32


class _DropMaxLengthNotice(logging.Filter):
    """Whisper checkpoints carry max_length=448, so every generate(max_new_tokens=) call warns
    that both are set (max_new_tokens wins, which is what we want): once per batch is noise."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "seem to have been set. `max_new_tokens` will take precedence" not in record.getMessage()


logging.getLogger("transformers.generation.utils").addFilter(_DropMaxLengthNotice())


def generate_batch(model, processor, audios: Sequence[np.ndarray], language: str, task: str,
                   max_new_tokens: int = 225, num_beams: int = 1) -> list[str]:
    """Transcripts of up to 30-s clips, language and task forced, special tokens removed."""
    import torch

    device = next(model.parameters()).device
    feats = features_for(processor, audios, _model_dtype(model), device)
    with torch.inference_mode():
        tokens = model.generate(
            input_features=feats, language=language, task=task, max_new_tokens=max_new_tokens,
            num_beams=num_beams,
        )
    return [t.strip() for t in processor.batch_decode(tokens, skip_special_tokens=True)]


def transcribe_all(model, processor, audios: Sequence[np.ndarray], language: str, task: str,
                   batch_size: int = 16, max_new_tokens: int = 225, desc: str = "transcribe",
                   num_beams: int = 1) -> list[str]:
    """Batched transcription with a progress bar (clips/s shows in the bar)."""
    from tqdm.auto import tqdm

    out: list[str] = []
    with tqdm(total=len(audios), desc=desc, unit="clip") as bar:
        for i in range(0, len(audios), batch_size):
            chunk = audios[i:i + batch_size]
            out += generate_batch(model, processor, chunk, language, task, max_new_tokens, num_beams)
            bar.update(len(chunk))
    return out


def transcribe_dataset(model, processor, ds, language: str, task: str, batch_size: int = 16,
                       max_new_tokens: int = 225, desc: str = "transcribe", num_beams: int = 1
                       ) -> tuple[list[str], float]:
    """Transcripts of a prepared split's `audio` column, read batch by batch (a test split
    of 3000 x 5-s clips is 3000 x 80 000 floats: too many to hold as Python lists), and
    the seconds spent generating."""
    from tqdm.auto import tqdm

    arrays = ds.with_format("numpy", columns=["audio"])
    out: list[str] = []
    seconds = 0.0
    with tqdm(total=len(ds), desc=desc, unit="clip") as bar:
        for i in range(0, len(ds), batch_size):
            chunk = list(arrays[i:i + batch_size]["audio"])
            t0 = time.perf_counter()
            out += generate_batch(model, processor, chunk, language, task, max_new_tokens, num_beams)
            seconds += time.perf_counter() - t0
            bar.update(len(chunk))
    return out, seconds


def transcribe_long(model, processor, audio: np.ndarray, language: str, task: str,
                    max_new_tokens: int = 225, batch_size: int = 8) -> str:
    """A file of any length: fixed 30-s windows transcribed as a batch and joined.

    Simple and predictable; a word cut by a window edge may come out broken (Whisper's
    timestamp-based long-form decoding avoids that but is much slower on a CPU).
    """
    step = CLIP_SECONDS * SAMPLING_RATE
    windows = [audio[i:i + step] for i in range(0, max(len(audio), 1), step)]
    texts = transcribe_all(model, processor, windows, language, task, batch_size, max_new_tokens,
                           desc="30-s windows")
    return " ".join(t for t in texts if t)


def load_audio(path: str | Path) -> np.ndarray:
    """A mono float32 16-kHz waveform from wav/flac/ogg/mp3 (soundfile, librosa as fallback)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"audio={path}: no such file")
    try:
        import soundfile as sf

        data, sr = sf.read(str(path), dtype="float32", always_2d=True)
        data = data.mean(axis=1)
    except Exception as first:
        try:
            import librosa

            data, sr = librosa.load(str(path), sr=None, mono=True)
        except Exception:
            raise UserError(f"audio={path}: cannot decode it ({first}); give a wav, flac, ogg or mp3 file") from None
    if sr != SAMPLING_RATE:
        import librosa

        data = librosa.resample(data, orig_sr=sr, target_sr=SAMPLING_RATE)
    if len(data) == 0:
        raise UserError(f"audio={path}: the file holds no samples")
    return np.asarray(data, dtype=np.float32)


def benchmark(model, processor, audios: Sequence[np.ndarray], language: str, task: str,
              batch_size: int, max_new_tokens: int = 225, autocast: bool = False) -> dict[str, float]:
    """Clips per second of generation for these settings (one warm-up batch not counted)."""
    import contextlib

    import torch

    device = next(model.parameters()).device
    ctx = (torch.autocast(device_type=device.type, dtype=torch.float16) if autocast and device.type == "cuda"
           else contextlib.nullcontext())
    with ctx:
        generate_batch(model, processor, audios[:batch_size], language, task, max_new_tokens)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for i in range(0, len(audios), batch_size):
            generate_batch(model, processor, audios[i:i + batch_size], language, task, max_new_tokens)
        if device.type == "cuda":
            torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    return {"clips": len(audios), "seconds": seconds, "clips_per_s": len(audios) / seconds,
            "batch_size": batch_size, "autocast": autocast}


def speed_compare(source: ModelSource, audios: Sequence[np.ndarray], language: str, task: str,
                  batch_size: int, precision: Precision, max_new_tokens: int = 225) -> dict[str, Any]:
    """Our eval settings vs the walkthrough's eval loop (8-bit model, batch 8, fp16 autocast)
    on the same clips; the walkthrough leg needs a GPU (bitsandbytes int8 + autocast)."""
    import gc

    import torch

    result: dict[str, Any] = {}
    model, processor, info = load_model(source, precision, "none")
    result["ours"] = {**benchmark(model, processor, audios, language, task, batch_size, max_new_tokens), **info}
    del model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        model, processor, info = load_model(source, "fp16", "int8")
        result["walkthrough"] = {
            **benchmark(model, processor, audios, language, task, 8, max_new_tokens, autocast=True), **info
        }
        result["speedup"] = result["ours"]["clips_per_s"] / result["walkthrough"]["clips_per_s"]
    else:
        result["walkthrough"] = "skipped: the walkthrough loop (int8 + fp16 autocast) needs a GPU"
    return result
