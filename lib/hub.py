"""Push a LoRA adapter folder to the Hugging Face Hub with a model card.

The token comes from Env (HF_TOKEN) and is passed to HfApi, never written anywhere; it is
checked before training so a missing one costs seconds, not a training run.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from lib.errors import UserError

log = logging.getLogger("whisper_ft")


def require_token(push: bool, token: str | None) -> None:
    if push and not token:
        raise UserError(
            "hub.push=true but HF_TOKEN is not set: put HF_TOKEN=<write token> in your env file "
            "(see env.example), or set hub.push=false"
        )


def model_card(*, repo_id: str, base: str, data: str, language: str, task: str,
               recipe: str | None, metrics: dict[str, Any], lora: dict[str, Any]) -> str:
    """README.md for the adapter repo: what it is, how it was made, how well it does."""
    def pct(v) -> str:
        return f"{v:.2f}%" if isinstance(v, (int, float)) else "n/a"

    # The checkpoint published is the best by normalized WER (lib/trainer.py BEST_METRIC):
    # the headline says so, with the exact-text WER of the same checkpoint beside it.
    wer_line = (
        f"**{pct(metrics.get('best_eval_normalized_wer'))}** normalized WER (NFKC, casefold, punctuation "
        f"such as \"।\" removed; the number the best checkpoint was chosen by), "
        f"{pct(metrics.get('best_eval_wer'))} exact-text WER"
    )
    rows = "\n".join(f"| {k} | {v} |" for k, v in metrics.items() if isinstance(v, (int, float, str)))
    return f"""---
base_model: {base}
library_name: peft
language:
- {language}
tags:
- whisper
- lora
- automatic-speech-recognition
---

# {repo_id}

A LoRA adapter for [{base}](https://huggingface.co/{base}) fine-tuned to {task}
`{language}` speech on the prepared dataset `{data}` (recipe: `{recipe or "defaults"}`).

- LoRA: r={lora.get("r")}, alpha={lora.get("alpha")}, dropout={lora.get("dropout")}, targets={lora.get("target_modules")}
- Best checkpoint ({metrics.get("best_checkpoint") or "n/a"}) on the validation split: {wer_line}

## Use

```python
from peft import PeftModel
from transformers import WhisperForConditionalGeneration, WhisperProcessor

base = WhisperForConditionalGeneration.from_pretrained("{base}")
model = PeftModel.from_pretrained(base, "{repo_id}")
processor = WhisperProcessor.from_pretrained("{repo_id}")
# generation_config.json carries language={language} task={task}
```

## Metrics

| metric | value |
|---|---|
{rows}
"""


def push_adapter(adapter_dir: Path, repo_id: str, token: str, private: bool = True, api=None) -> str:
    """Create the repo if needed and upload the folder; returns the repo URL."""
    from huggingface_hub import HfApi

    api = api or HfApi(token=token)
    try:
        url = api.create_repo(repo_id=repo_id, private=private, exist_ok=True, repo_type="model")
        api.upload_folder(folder_path=str(adapter_dir), repo_id=repo_id, repo_type="model",
                          commit_message="Upload LoRA adapter")
    except Exception as e:  # network / auth: the adapter is safe on disk, say so
        raise RuntimeError(
            f"push to {repo_id} failed ({type(e).__name__}: {e}); the adapter is saved in {adapter_dir}, "
            f"rerun the job (it finds the finished run) or upload that folder by hand"
        ) from None
    log.info("pushed %s to %s", adapter_dir, url)
    return str(url)
