"""Load Whisper for every job: the base (full, 8-bit or 4-bit), its processor, a LoRA adapter.

The one place that decides, for train, eval, export and transcribe alike:
  device        pick_device(): the CUDA GPU when there is one, else the CPU
  precision     resolve_precision(): auto -> bf16 on GPUs with native bf16, fp16 on older
                GPUs (T4, V100), fp32 on a CPU; fp16 on a CPU is an error, bf16 a warning
  quantization  check_quantization(): tried on one tiny layer before any weights are read
  base dtype    load_base(base_dtype=): fp32 weights with autocast, or the compute dtype
  what to load  resolve_source(): run= / adapter= / model= -> base (+ adapter), from the
                flags, the run folder and the adapter's adapter_config.json
  processor     load_processor(): the first of the given places that has one

Checks that cost seconds run before any weights are read: the base is a Whisper model
(config.model_type), the quantization works on this machine, the precision fits it.
Making the loaded base trainable (freeze, checkpointing, LoRA) is lib/train/lora.py's.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lib.errors import UserError

log = logging.getLogger("whisper_ft")

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}

RANDOM_WEIGHTS = "random_weights"
"""The config.json key lib/tools/models.py save_random_whisper sets on the models it builds (the
demo's tiny one, the bench's): weights never trained, so every transcript is noise and a WER
measured on them means nothing. It travels with save_pretrained (an export's merged model keeps it)."""


def has_random_weights(model) -> bool:
    """Whether `model` (a Whisper, or a PeftModel on one) has random weights (RANDOM_WEIGHTS)."""
    return bool(getattr(getattr(model, "config", None), RANDOM_WEIGHTS, False))


def random_weights_note(model) -> str | None:
    """The summary's line for a model with random weights (train's and eval's), else None."""
    if not has_random_weights(model):
        return None
    return "the base has random weights (built by lib/tools/models.py, as the demo does): these WERs mean nothing"


def torch_dtype(name: str) -> torch.dtype:
    return DTYPES[name]


def load_base_config(base: str, token: str | None = None):
    """The base's config.json only (kilobytes): refuse anything that is not Whisper."""
    from transformers import AutoConfig

    try:
        cfg = AutoConfig.from_pretrained(base, token=token)
    except (OSError, ValueError) as e:
        raise UserError(
            f"model.base={base}: cannot read its config ({str(e).splitlines()[0]}); give a local "
            f"Whisper folder or a Hub id such as openai/whisper-large-v2 (gated repos need HF_TOKEN)"
        ) from None
    if getattr(cfg, "model_type", None) != "whisper":
        raise UserError(
            f"model.base={base} is a '{getattr(cfg, 'model_type', '?')}' model, not Whisper: "
            f"set model.base to a Whisper checkpoint, e.g. openai/whisper-large-v2"
        )
    return cfg


def load_processor(*places: str | None, token: str | None = None):
    """The WhisperProcessor (tokenizer + feature extractor) of the first place that has one.

    Eval, export and transcribe pass (adapter, base): a run saves its processor next to the
    adapter, so the adapter's wins; train passes the base alone.
    """
    from transformers import WhisperProcessor

    errors = []
    for where in [p for p in places if p]:
        if _is_local(where) and not (Path(where).expanduser() / "tokenizer_config.json").is_file():
            errors.append(f"{where}: no tokenizer_config.json")
            continue
        try:
            return WhisperProcessor.from_pretrained(where, token=token)
        except (OSError, ValueError) as e:
            errors.append(f"{where}: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
    raise UserError(f"no Whisper processor (tokenizer + feature extractor) found: {'; '.join(errors)}")


def pick_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_precision(precision: str, device: str | None = None, flag: str = "model.precision") -> str:
    """auto -> bf16 on GPUs that support it (Ampere+), fp16 on older GPUs (T4, V100), fp32 on CPU.

    `flag` is the name of the setting in the caller's config (train: model.precision; eval,
    export and transcribe: precision), so that the error names what to change.
    including_emulation=False: torch otherwise answers yes on a T4/V100, where bf16 is emulated
    and far slower than fp16.
    """
    cuda = (device or pick_device()) == "cuda"
    if precision == "auto":
        if not cuda:
            return "fp32"
        return "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16"
    if precision == "fp16" and not cuda:
        raise UserError(
            f"{flag}=fp16 needs a CUDA GPU and none is visible: "
            f"use {flag}=auto (fp32 on CPU) or fp32"
        )
    if precision == "bf16" and not cuda:
        # Allowed when asked for by name: CPU autocast does bf16, slowly on most CPUs. It is how
        # the bf16 numerics of the fast recipes are checked on real weights without a GPU
        # (lib/tools/bench_quality.py cpu_bf16=true).
        log.warning("%s=bf16 on a CPU: bf16 on the CPU, for checking numerics; slower than fp32 on "
                    "most CPUs (%s=auto picks fp32)", flag, flag)
        return precision
    if precision == "bf16" and not torch.cuda.is_bf16_supported(including_emulation=False):
        raise UserError(f"{flag}=bf16: this GPU has no bf16 (e.g. T4); use fp16 or auto")
    return precision


def check_quantization(quantization: str, flag: str = "model.quantization") -> None:
    """int8 / nf4 need bitsandbytes with a backend for this device; test one tiny layer."""
    if quantization == "none":
        return
    device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        import bitsandbytes as bnb

        with torch.no_grad():
            if quantization == "int8":
                layer = bnb.nn.Linear8bitLt(64, 64, has_fp16_weights=False).to(device)
                x = torch.randn(2, 64, device=device, dtype=torch.float16)
            else:
                layer = bnb.nn.Linear4bit(64, 64, quant_type="nf4", compute_dtype=torch.float32).to(device)
                x = torch.randn(2, 64, device=device)
            layer(x)
    except Exception as e:  # ImportError, missing native library, unsupported device
        raise UserError(
            f"{flag}={quantization}: bitsandbytes does not work on this machine ({device}): "
            f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}; "
            f"use {flag}=none (more memory) or run on a CUDA GPU"
        ) from None


def quantization_config(quantization: str, compute_dtype: torch.dtype):
    from transformers import BitsAndBytesConfig

    if quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    if quantization == "nf4":
        # QLoRA: NF4 storage, double-quantised constants (~0.4 bit/param saved), matmuls in compute_dtype.
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype,
        )
    return None


class _Once(logging.Filter):
    """Let each distinct message through once, then say that repeats are dropped.

    Why: bitsandbytes' MatMul8bitLt logs "inputs will be cast from torch.float32 to float16"
    on every call of every 8-bit layer, not once: 66,592 lines in a 10-step large-v2 run
    (6.7 MB of log), which buries everything else in a real run's log.
    """

    def __init__(self):
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        if msg in self.seen:
            return False
        self.seen.add(msg)
        record.msg, record.args = f"{msg} (logged once; repeats dropped)", None
        return True


def quiet_repeated_bitsandbytes_warnings() -> None:
    lg = logging.getLogger("bitsandbytes.autograd._functions")
    if not any(isinstance(f, _Once) for f in lg.filters):
        lg.addFilter(_Once())


def load_base(name: str, quantization: str = "none", precision: str = "fp32", base_dtype: str = "fp32",
              device: str | None = None, token: str | None = None, flag: str = "model"):
    """WhisperForConditionalGeneration `name`, quantized per `quantization`; precision already resolved.

    base_dtype (quantization=none only): "fp32" keeps fp32 weights with AMP casting per op,
    the configuration measured in docs/results.md for training; "compute" stores the
    weights in the compute dtype, half the memory (large-v2: 6.2 -> 3.1 GB) and no per-op
    weight cast: what inference and merging use, and train's model.base_dtype=compute.
    The trainable LoRA weights stay fp32 either way (PEFT's autocast_adapter_dtype).
    device (quantization=none): move the model there; None leaves it on the CPU (the Trainer
    moves it). A quantized base is quantized while loading, onto one device: this process's
    GPU (torchrun sets LOCAL_RANK per process), or the CPU.
    """
    from transformers import WhisperForConditionalGeneration

    compute = DTYPES[precision]
    kwargs: dict[str, Any] = {"token": token}
    if quantization == "none":
        kwargs["dtype"] = compute if base_dtype == "compute" else torch.float32
    else:
        quiet_repeated_bitsandbytes_warnings()
        kwargs["quantization_config"] = quantization_config(quantization, compute)
        kwargs["dtype"] = compute
        kwargs["device_map"] = {"": int(os.environ.get("LOCAL_RANK", 0)) if torch.cuda.is_available() else "cpu"}
    try:
        model = WhisperForConditionalGeneration.from_pretrained(name, **kwargs)
    except OSError as e:
        raise UserError(f"{flag}={name}: cannot load a Whisper model ({str(e).splitlines()[0]})") from None
    if quantization == "none" and device is not None:
        model.to(device)
    return model


def set_spec_augment(model, on: bool, mask_time_prob: float, mask_feature_prob: float) -> None:
    """SpecAugment in the encoder input while training (train.spec_augment, train.mask_time_prob,
    train.mask_feature_prob). Why through the config: WhisperModel masks log-mel frames/bins only
    when config.apply_spec_augment is true, and Whisper's released configs say false, so setting
    mask_time_prob alone changes nothing. The masks are drawn only in training mode (eval and
    generate see the whole input); masked frames and bins are set to 0.
    """
    model.config.apply_spec_augment = bool(on)
    model.config.mask_time_prob = mask_time_prob
    model.config.mask_feature_prob = mask_feature_prob


def set_generation_language(model, language: str, task: str) -> None:
    """Generation (eval WER, and whoever loads the adapter) decodes in `language`, not auto-detect."""
    gen = model.generation_config
    gen.language = language
    gen.task = task
    gen.forced_decoder_ids = None  # the old way; with language/task set, generate() builds the prompt
    if hasattr(model.config, "forced_decoder_ids"):
        model.config.forced_decoder_ids = None


# --- What eval, export and transcribe load: run= / adapter= / model= -------------------------


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


def adapter_config(adapter: str) -> dict[str, Any]:
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
    """Turn run= / model= / adapter= into a ModelSource; errors name the flag to fix.

      run=NAME            DATA_DIR/runs/NAME/adapter, on the base named in its adapter_config.json
                          (or model=, which must then have the same shapes);
      adapter=DIR|HUB_ID  a PEFT LoRA adapter, on its own base or on model=;
      model=DIR|HUB_ID    a plain or merged Whisper, no adapter.
    """
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
        acfg = adapter_config(adapter)
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

    declared = adapter_config(adapter).get("base_model_name_or_path")
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


def attach_adapter(model, adapter: str, base_name: str):
    """The base with the LoRA adapter attached for inference (PeftModel; the base stays reachable
    through disable_adapter()), after the shape check."""
    from peft import PeftModel

    check_adapter_matches(adapter, model, base_name)
    return PeftModel.from_pretrained(model, adapter, is_trainable=False).eval()


def load_model(source: ModelSource, precision: str = "auto", quantization: str = "none",
               device: str | None = None, token: str | None = None):
    """(model, processor, info) for inference: the base with the adapter attached, or the plain model.

    The weights are stored in the compute dtype (no fp32 masters are needed without training).
    """
    device = device or pick_device()
    resolved = resolve_precision(precision, device, flag="precision")
    check_quantization(quantization, flag="quantization")
    model = load_base(source.base, quantization, resolved, base_dtype="compute", device=device, token=token)
    model.eval()
    if source.adapter:
        model = attach_adapter(model, source.adapter, source.base)
    info = {"device": device, "dtype": str(DTYPES[resolved]).removeprefix("torch."), "quantization": quantization}
    return model, load_processor(source.adapter, source.base, token=token), info
