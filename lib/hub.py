"""Push a model folder to the Hugging Face Hub with a model card: train's adapter, export's merged model.

Both jobs take the same `hub` section (hub.push, hub.repo_id, hub.private). The token comes
from Env (HF_TOKEN) and is passed to HfApi, never written anywhere; `require_token` runs
before any work, so a missing one costs seconds, not a training run or a merge.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from lib.errors import UserError

log = logging.getLogger("whisper_ft")


@dataclass
class HubConfig:
    push: bool = False
    """upload the job's output (train: the adapter; export: the merged model) with a model card;
    needs HF_TOKEN with write scope"""
    repo_id: str | None = None
    """e.g. your-name/whisper-large-v2-hi-lora"""
    private: bool = True
    """create the repo private"""

    def __post_init__(self):
        if self.push and not self.repo_id:
            raise UserError("hub.push=true needs hub.repo_id=OWNER/NAME")


def require_token(hub: HubConfig, token: str | None) -> None:
    if hub.push and not token:
        raise UserError(
            "hub.push=true but HF_TOKEN is not set: put HF_TOKEN=<write token> in your env file "
            "(see env.example), or set hub.push=false"
        )


def _pct(v) -> str:
    return f"{v:.2f}%" if isinstance(v, (int, float)) else "n/a"


def model_card(*, kind: Literal["adapter", "merged"], repo_id: str, base: str, language: str, task: str,
               data: str | None = None, recipe: str | None = None, lora: dict[str, Any] | None = None,
               metrics: dict[str, Any] | None = None, report_md: str | None = None,
               verify: dict[str, Any] | None = None, dtype: str | None = None) -> str:
    """README.md for the Hub repo: metadata header, what it is, how to use it, how it was made,
    how well it does (the training metrics, the eval report, the export check: what is known)."""
    adapter = kind == "adapter"
    lines = [
        "---",
        f"base_model: {base}",
        f"library_name: {'peft' if adapter else 'transformers'}",
        "pipeline_tag: automatic-speech-recognition",
        "language:",
        f"- {language}",
        "tags:",
        "- whisper",
        "- lora",
        *(["- peft"] if not adapter else []),
        "---",
        "",
        f"# {repo_id}",
        "",
    ]
    what = (f"A LoRA adapter for [{base}](https://huggingface.co/{base})" if adapter
            else f"Whisper `{base}` with a LoRA adapter merged into its weights ({dtype})")
    lines += [f"{what}, fine-tuned to {task} `{language}` speech"
              + (f" on the prepared dataset `{data}`" if data else "")
              + (f" (recipe: `{recipe}`)." if adapter else "."), ""]
    if lora:
        lines += [f"- LoRA: r={lora.get('r')}, alpha={lora.get('alpha')}, dropout={lora.get('dropout')}, "
                  f"targets={lora.get('target_modules')}"]
    if adapter:
        # The checkpoint published is the best by normalized WER (lib/train/trainer.py BEST_METRIC):
        # the headline says so, with the exact-text WER of the same checkpoint beside it.
        m = metrics or {}
        lines += [f"- Best checkpoint ({m.get('best_checkpoint') or 'n/a'}) on the validation split: "
                  f"**{_pct(m.get('best_eval_normalized_wer'))}** normalized WER (NFKC, casefold, punctuation "
                  f"such as \"।\" removed; the number the best checkpoint was chosen by), "
                  f"{_pct(m.get('best_eval_wer'))} exact-text WER", ""]
    lines += ["## Use", "", "```python"]
    if adapter:
        lines += [
            "from peft import PeftModel",
            "from transformers import WhisperForConditionalGeneration, WhisperProcessor",
            "",
            f'base = WhisperForConditionalGeneration.from_pretrained("{base}")',
            f'model = PeftModel.from_pretrained(base, "{repo_id}")',
            f'processor = WhisperProcessor.from_pretrained("{repo_id}")',
            f"# generation_config.json carries language={language} task={task}",
        ]
    else:
        lines += [
            "from transformers import pipeline",
            f'asr = pipeline("automatic-speech-recognition", model="{repo_id}")',
            'print(asr("clip.wav")["text"])',
        ]
    lines += ["```", ""]
    if verify:
        lines += [f"Export check: {verify.get('identical', '?')}/{verify.get('clips', '?')} test clips transcribed "
                  f"identically by the merged model and base + adapter.", ""]
    if metrics:
        lines += ["## Metrics", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in metrics.items() if isinstance(v, (int, float, str))]
        lines += [""]
    if not adapter or report_md:
        lines += ["## Evaluation", "",
                  report_md.split("\n", 1)[1].strip() if report_md else "(no eval report yet)", ""]
    return "\n".join(lines)


def push_folder(folder: Path, hub: HubConfig, token: str, card: str, what: str, api=None) -> str:
    """Write the model card into `folder`, create the repo if needed and upload the folder;
    returns the repo URL. A failed upload leaves the folder in place and says so (exit 1: a
    rerun finds the finished work and pushes again)."""
    from huggingface_hub import HfApi

    (folder / "README.md").write_text(card, encoding="utf-8")
    api = api or HfApi(token=token)
    try:
        url = api.create_repo(repo_id=hub.repo_id, private=hub.private, exist_ok=True, repo_type="model")
        api.upload_folder(folder_path=str(folder), repo_id=hub.repo_id, repo_type="model",
                          commit_message=f"Upload {what}")
    except Exception as e:  # network / auth: the folder is safe on disk, say so
        raise RuntimeError(
            f"push to {hub.repo_id} failed ({type(e).__name__}: {e}); the {what} is saved in {folder}: check that "
            f"HF_TOKEN has write access, then rerun the job (it finds the finished work) or upload that folder by hand"
        ) from None
    log.info("pushed %s to %s", folder, url)
    return str(url)
