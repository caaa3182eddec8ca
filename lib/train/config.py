"""The typed config of `make train` (jobs/train.py): defaults < recipe YAML < key=value flags.

Defaults are the walkthrough's recipe: whisper-large-v2 in 8-bit, LoRA r=32 / alpha=64 on
q_proj and v_proj, lr 1e-3 with 50 warm-up steps, batch 8, fp16. The resolved config is
written to DATA_DIR/runs/RUN/config.yaml (TrainPlan.record: with the language the run resolved);
`make eval` and `make export` read it there.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from lib.config import to_dict
from lib.dataset.corpora import DataFlag
from lib.errors import UserError
from lib.hub import HubConfig
from lib.whisper import MAX_NEW_TOKENS, MAX_SECONDS, TIME_STEP


@dataclass
class ModelConfig:
    base: str = "openai/whisper-large-v2"
    """base model: a local folder or a Hub id (read with HF_TOKEN when set)"""
    quantization: Literal["int8", "nf4", "none"] | None = "int8"
    """base weights in 8-bit (LLM.int8), 4-bit NF4 (QLoRA) or full precision (none)"""
    precision: Literal["fp16", "bf16", "fp32", "auto"] = "fp16"
    """compute precision; auto = bf16 where the GPU supports it, else fp16 on a GPU, fp32 on CPU"""
    base_dtype: Literal["fp32", "compute"] = "fp32"
    """frozen base weights with quantization=none: fp32 masters (measured default) or the
    compute dtype (half the weight memory, no per-op casts; measured in docs/results.md)"""
    gradient_checkpointing: bool = True
    """recompute activations in the backward pass: ~30% slower, far less activation memory"""
    checkpoint_fraction: float = 1.0
    """with gradient_checkpointing: share of encoder/decoder layers checkpointed, evenly spaced
    (e.g. 0.75: a quarter of the layers keep their activations; faster, more memory)"""

    int8_half_inputs: bool = True
    """quantization=int8 with fp16/bf16 precision: hand the 8-bit layers their input in that
    precision (bitsandbytes casts it to fp16 in forward anyway; the backward then multiplies in
    half precision, not fp32); false = the fp32 inputs PEFT's upcast leaves"""

    def __post_init__(self):
        # lib.config reads the flag value `none` as YAML null; both mean full precision here.
        if self.quantization is None:
            self.quantization = "none"
        if not 0 < self.checkpoint_fraction <= 1:
            raise UserError(f"model.checkpoint_fraction={self.checkpoint_fraction}: must be in (0, 1] "
                            f"(for none, set model.gradient_checkpointing=false)")


@dataclass
class LoraSection:
    r: int = 32
    """rank: higher = more capacity and a bigger adapter (size grows linearly)"""
    alpha: int = 64
    """scaling; the update is scaled by alpha / r"""
    dropout: float = 0.05
    """dropout on the LoRA branch input"""
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    """module names to adapt, or [all-linear] for every linear layer but the output head"""

    def __post_init__(self):
        if self.r < 1:
            raise UserError(f"lora.r={self.r}: the rank must be >= 1 (e.g. lora.r=32)")
        if not 0 <= self.dropout < 1:
            raise UserError(f"lora.dropout={self.dropout}: must be in [0, 1)")
        if not self.target_modules:
            raise UserError("lora.target_modules is empty: e.g. lora.target_modules=q_proj,v_proj")


@dataclass
class TrainSection:
    batch_size: int = 8
    """clips per device per step; memory grows ~linearly with it"""
    eval_batch_size: int | None = None
    """clips per batch in evaluation (generation); default = batch_size"""
    grad_accum: int = 1
    """steps accumulated per optimizer update: effective batch = batch_size x grad_accum"""
    lr: float = 1e-3
    """peak learning rate (LoRA tolerates ~10x a full fine-tune's)"""
    warmup_steps: int = 50
    """linear warm-up optimizer steps before the linear decay"""
    max_steps: int | None = None
    """optimizer steps to train; when set it wins over epochs"""
    epochs: float = 3.0
    """passes over the train split when max_steps is not set"""
    eval_steps: int = 200
    """evaluate (loss + generated WER on the validation split) every N optimizer steps"""
    save_steps: int = 200
    """checkpoint every N steps; must be a multiple of eval_steps (best-by-WER bookkeeping)"""
    logging_steps: int = 25
    """log loss / lr to TensorBoard and log_history.json every N steps"""
    keep_checkpoints: int = 2
    """finished checkpoints kept (plus the best one); older ones are deleted"""
    generation_max_length: int | None = None
    """max tokens generated per clip in evaluation; default: the validation split's longest label
    + 25 % + 8 (lib.inference.decode_budget), at most 444 (Whisper's 448 positions minus the prompt).
    A fixed 225 cut 30-s Hindi segments (about 390 tokens) and counted the rest as deletions"""
    max_eval_samples: int | None = None
    """evaluate on the first N validation clips only (generation is the slow part)"""
    seed: int = 42
    """seeds weights of the LoRA init, dropout and data order"""
    num_workers: int = 2
    """dataloader worker processes reading shards, decoding audio and computing log-mel; 0 = in
    the main process. One worker decodes ~60+ clips/s of 5-s mp3 (docs/results.md, data benchmark)"""
    shuffle_buffer: int = 4096
    """rows shuffled together: consecutive shards (in a seeded order) are read in windows of at
    least this many rows, each window in a seeded random order (lib/train/stream.py). Memory per worker
    is about one window of encoded audio (4096 5-s mp3 clips: ~160 MB)"""
    data_trace: bool = False
    """append "position, corpus, clip id" of every sample read to RUN/data_order.tsv (which clips a
    loss spike saw; that a resumed run continued the order)"""
    compile: Literal["none", "layers", "model"] | None = "none"
    """torch.compile: layers = each encoder/decoder layer (one graph per stack, about a minute
    to compile), model = the whole model through Trainer; see docs/speed.md"""
    timing_warmup: int = 3
    """first optimizer steps left out of the steady samples/s in metrics.json"""
    profile_steps: int = 0
    """profile the last N steps (torch.profiler): RUN/profile.txt, where GPU time goes; not timed"""
    # Samples beyond the prepared rows (lib/train/augment.py): all off by default, the walkthrough's training.
    timestamp_probability: float = 0.0
    """share of clips trained with timestamps (<|0.00|> text <|end|>) instead of <|notimestamps|>;
    keeps long-form (timestamped) decoding alive, which all-<|notimestamps|> fine-tuning erodes"""
    prompt_probability: float = 0.0
    """share of clips conditioned on the previous clip's text (<|startofprev|> ...), as long-form
    decoding feeds it; the prompt is masked out of the loss"""
    no_speech_fraction: float = 0.0
    """share of training samples that are silence/noise clips labelled <|nospeech|> (<|nocaptions|>
    in v2), added on top of the data: 0.1 with 1000 clips adds 111; at most 0.5"""
    no_speech_label: Literal["token", "empty"] = "token"
    """label of those clips: token = <|sot|> <|nospeech|> <|endoftext|> (Whisper's own target, read by
    its no-speech probability); empty = the language/task prompt then <|endoftext|> (what forced-language
    decoding, as in eval and transcribe, sees)"""
    no_speech_dir: str | None = None
    """a folder of audio files without speech (noise, music, room tone) to cut those clips from;
    default: generated silence and white/pink noise at -70..-20 dBFS"""
    mask_language_token: bool = False
    """leave the language token (<|hi|> after <|sot|>) out of the loss: every label starts with it,
    and training on it teaches the model that all audio is that language (English language-ID
    accuracy 100 % -> 0 % on whisper-base in 60 steps); forced-language decoding is unaffected"""
    spec_augment: bool = False
    """SpecAugment in the encoder while training (sets the model config's apply_spec_augment)"""
    mask_time_prob: float = 0.05
    """with spec_augment: share of the 3000 mel frames zeroed, in spans of 10 frames (100 ms)"""
    mask_feature_prob: float = 0.0
    """with spec_augment: share of the mel bins zeroed, in bands of 10 bins"""
    speed_perturb: float = 0.0
    """raw-audio speed change up to +-this share (0.1: 0.9-1.1x, pitch moves with it); 0 = off"""
    gain_db: float = 0.0
    """raw-audio gain drawn from +-this many dB per clip (clipped to [-1, 1]); 0 = off"""
    noise_snr_db: float | None = None
    """add white noise at an SNR drawn from [this, this + 20] dB per clip; unset = off"""
    pack: bool = False
    """pack consecutive clips of the shuffled stream into one 30-s window per sample, labelled with one
    timestamped segment per clip (lib/train/packing.py): a 5-s clip alone is 5/6 padding; steps count
    windows, not clips. Needs train.timestamp_probability=0 (windows carry their own timestamps)"""
    pack_gap: list[float] = field(default_factory=lambda: [0.3, 0.8])
    """with pack: pause between two clips of a window, drawn from [min, max] seconds per clip in
    whole 0.02-s steps (a speaker's pause; the next clip starts on the timestamp grid)"""
    pack_plain_fraction: float = 0.0
    """with pack: share of windows packed like the others but labelled <|notimestamps|> with the
    clips' texts joined by spaces (drawn per window from train.seed); measured on whisper-base, 20 %
    of them instead of single-clip windows left clip WER at 24 % (docs/results.md)"""
    pack_single_fraction: float = 0.1
    """with pack: share of windows that hold one clip with its prepared <|notimestamps|> label, the
    form clip eval decodes (drawn per window from train.seed); each costs a whole window for one clip.
    Measured on whisper-base (docs/results.md): 10 % kept clip WER over 5 seeds (as 20 % did, with
    windows 2.3 s fuller of speech); 5 % was worse on 2 seeds of 3 (one looping clip)"""
    pack_lookahead: int = 16
    """with pack: clips a window may pass over that do not fit, to take a later one that does (0 =
    strictly consecutive clips; 16 fills 5-s clips' windows about 1.5 s fuller)"""
    report_to: Literal["tensorboard", "mlflow", "wandb"] = "tensorboard"
    """experiment tracking besides RUN/tb (always written): mlflow (MLFLOW_TRACKING_URI, default the
    file store DATA_DIR/mlruns) or wandb (offline unless WANDB_API_KEY is set); see lib/train/tracking.py"""

    def __post_init__(self):
        if self.compile is None:  # the flag value `none` reads as YAML null
            self.compile = "none"
        for name in ("batch_size", "grad_accum", "eval_steps", "save_steps", "logging_steps"):
            if getattr(self, name) < 1:
                raise UserError(f"train.{name}={getattr(self, name)}: must be >= 1")
        if self.lr <= 0:
            raise UserError(f"train.lr={self.lr}: must be > 0 (e.g. train.lr=1e-3)")
        if self.max_steps is not None and self.max_steps < 1:
            raise UserError(f"train.max_steps={self.max_steps}: must be >= 1 (or unset to use train.epochs)")
        if self.max_steps is None and self.epochs <= 0:
            raise UserError(f"train.epochs={self.epochs}: must be > 0 (or set train.max_steps)")
        if self.save_steps % self.eval_steps:
            raise UserError(
                f"train.save_steps={self.save_steps} must be a multiple of train.eval_steps="
                f"{self.eval_steps}, so every checkpoint has a WER to pick the best by"
            )
        if self.profile_steps < 0 or (self.max_steps is not None
                                      and self.profile_steps and self.profile_steps >= self.max_steps):
            raise UserError(f"train.profile_steps={self.profile_steps}: must be >= 0 and below train.max_steps")
        if self.generation_max_length is not None and not 1 <= self.generation_max_length <= MAX_NEW_TOKENS:
            raise UserError(f"train.generation_max_length={self.generation_max_length}: must be 1..{MAX_NEW_TOKENS}, "
                            f"or unset to fit the validation labels")
        if self.shuffle_buffer < 1:
            raise UserError(f"train.shuffle_buffer={self.shuffle_buffer}: must be >= 1 (1 = no shuffling)")
        if self.keep_checkpoints < 1:
            raise UserError(f"train.keep_checkpoints={self.keep_checkpoints}: must be >= 1")
        for name in ("timestamp_probability", "prompt_probability", "mask_time_prob", "mask_feature_prob"):
            if not 0 <= getattr(self, name) <= 1:
                raise UserError(f"train.{name}={getattr(self, name)}: must be in [0, 1]")
        if not 0 <= self.no_speech_fraction <= 0.5:
            raise UserError(f"train.no_speech_fraction={self.no_speech_fraction}: must be in [0, 0.5] "
                            f"(0.05-0.1 is typical; more starves the real data)")
        if self.no_speech_dir and not self.no_speech_fraction:
            raise UserError(f"train.no_speech_dir={self.no_speech_dir} is set but train.no_speech_fraction=0: "
                            f"set train.no_speech_fraction (e.g. 0.1) to use it")
        if not 0 <= self.speed_perturb < 0.5:
            raise UserError(f"train.speed_perturb={self.speed_perturb}: must be in [0, 0.5) (e.g. 0.1)")
        if self.gain_db < 0:
            raise UserError(f"train.gain_db={self.gain_db}: must be >= 0 (e.g. 6)")
        if len(self.pack_gap) != 2 or not TIME_STEP <= self.pack_gap[0] <= self.pack_gap[1] <= MAX_SECONDS / 3:
            # a gap under one timestamp step would give a segment's end and the next one's start one
            # timestamp; a third of the window as a pause leaves room for hardly two clips
            raise UserError(f"train.pack_gap={','.join(map(str, self.pack_gap))}: give min,max seconds with "
                            f"{TIME_STEP} <= min <= max <= {MAX_SECONDS / 3:g} (e.g. train.pack_gap=0.3,0.8)")
        for name in ("pack_single_fraction", "pack_plain_fraction"):
            if not 0 <= getattr(self, name) <= 1:
                raise UserError(f"train.{name}={getattr(self, name)}: must be in [0, 1] (e.g. 0.2)")
        if self.pack_single_fraction + self.pack_plain_fraction > 1:
            raise UserError(f"train.pack_single_fraction={self.pack_single_fraction} + train.pack_plain_fraction="
                            f"{self.pack_plain_fraction}: shares of the windows, at most 1 together")
        if self.pack_lookahead < 0:
            raise UserError(f"train.pack_lookahead={self.pack_lookahead}: must be >= 0 (0 = consecutive clips)")
        if self.pack and self.timestamp_probability:
            raise UserError(f"train.timestamp_probability={self.timestamp_probability} with train.pack=true: packed "
                            f"windows carry timestamps, plain and single-clip ones do not (their shares are "
                            f"train.pack_plain_fraction and train.pack_single_fraction); set "
                            f"train.timestamp_probability=0")

    def samples_changed(self) -> bool:
        """Whether any option of lib/train/augment.py is on (the train split is then wrapped)."""
        return bool(self.timestamp_probability or self.prompt_probability or self.no_speech_fraction
                    or self.speed_perturb or self.gain_db or self.noise_snr_db is not None)


@dataclass
class TrainConfig(DataFlag):
    run: str = ""
    """run name: outputs go to DATA_DIR/runs/RUN; a rerun with the same name resumes"""
    data: str = ""
    """prepared dataset: a name (DATA_DIR/prepared/NAME, written by `make prepare`), a folder or an
    fsspec URL (s3://bucket/prepared/NAME, read in place); several with weights:
    data=cv_hi:0.7,fleurs_hi:0.3 (each sampled by its weight; validation WER per corpus)"""
    language: str = ""
    """language code or name (e.g. hi); default: the prepared dataset's language"""
    task: Literal["transcribe", "translate"] = "transcribe"
    """transcribe in the language, or translate to English"""
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraSection = field(default_factory=LoraSection)
    train: TrainSection = field(default_factory=TrainSection)
    hub: HubConfig = field(default_factory=HubConfig)

    def __post_init__(self):
        if not self.data:
            raise UserError("no dataset: set data=NAME (a folder under DATA_DIR/prepared from `make prepare`)")
        self.corpora()  # a malformed list or weight fails here, before anything loads
        if not self.run:
            raise UserError("no run name: set run=NAME (outputs go to DATA_DIR/runs/NAME)")
        if "/" in self.run or self.run.startswith("."):
            raise UserError(f"run={self.run!r}: use a plain folder name, no '/'")


@dataclass
class TrainPlan:
    """What `make train` resolved from its config, the data and the machine (lib.train.trainer.check_setup),
    kept apart from the TrainConfig you gave: the later steps read it from here."""

    language: str
    """the language code the run trains for: language=, else the first corpus's manifest"""
    precision: str
    """the compute precision model.precision resolved to on this machine (fp16, bf16 or fp32)"""

    def record(self, cfg: TrainConfig) -> dict[str, Any]:
        """The config as the run records it (RUN/config.yaml, the resume check, the tracker's
        parameters): yours, with the resolved language (`make eval` and `make export` read it)."""
        return {**to_dict(cfg), "language": self.language}
