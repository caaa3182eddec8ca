"""Synthesize short English clips with espeak-ng: the other-language set of eval's also= check.

    DATA_DIR=data python -m lib.tools.make_english_clips            # -> data/corpora/synth-en
    DATA_DIR=data python -m jobs.prepare data=synth-en language=en source.kind=manifest \
        source.path=data/corpora/synth-en/manifest.csv model=openai/whisper-base   # or a local copy
    python -m jobs.eval run=RUN also=synth-en      # English WER and language-ID accuracy, base and fine-tune

Builds SENTENCES distinct short English sentences (3-8 words) from a small vocabulary and
a few templates, speaks each with a random espeak-ng English voice variant, speed and
pitch (lib.tools.make_synthetic_corpus.synthesize: 16 kHz mono wav) and writes
OUT/clips/*.wav plus OUT/manifest.csv (audio,text,split; every row in `split`, test by
default, which is what eval's also_split= reads). Same seed and config -> the same clips.
"""

from __future__ import annotations

import csv
import logging
import random
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from lib.cli import run_job
from lib.env import Env
from lib.errors import UserError
from lib.tools.make_synthetic_corpus import make_sentences, synthesize

log = logging.getLogger("whisper_ft")

SUBJECTS = [("my brother", 3), ("my sister", 3), ("the farmer", 3), ("the teacher", 3), ("our neighbour", 3),
            ("the children", 0), ("we", 0), ("they", 0), ("John", 3), ("Mary", 3)]
VERBS = {"eat": ["an apple", "some bread", "the rice", "a mango"], "drink": ["water", "milk", "tea"],
         "read": ["a book", "the newspaper", "a story", "the letter"],
         "buy": ["fresh fruit", "new clothes", "some flowers", "vegetables"],
         "watch": ["a film", "the clouds", "the birds"], "sell": ["fruit", "old books", "milk"]}
PLACES = ["at the market", "at home", "at school", "in the shop", "in the village", "in the park", "at the office"]
TIMES = ["today", "every morning", "in the evening", "at night", "on Sunday", "after lunch"]
WEATHER = [("the weather", "nice"), ("the water", "cold"), ("the food", "hot"), ("the sky", "blue"),
           ("the road", "long"), ("the house", "big"), ("the shop", "closed")]
VOICES = ["en", "en+m1", "en+m3", "en+f2", "en+f3", "en-us", "en-us+f4"]


@dataclass
class EnglishClipsConfig:
    out: str | None = None
    """output folder (default DATA_DIR/corpora/synth-en)"""
    sentences: int = 100
    """distinct sentences = clips (about 2 s each)"""
    split: str = "test"
    """the split every clip goes to (eval's also_split= reads test)"""
    seed: int = 0
    workers: int = 2
    """espeak-ng + ffmpeg processes at a time"""
    force: bool = False
    """replace clips already in OUT"""

    def __post_init__(self):
        if self.sentences < 1 or self.workers < 1:
            raise UserError("sentences and workers must be >= 1")
        if self.split not in ("train", "validation", "test"):
            raise UserError(f"split={self.split}: use train, validation or test")


def random_sentence(rng: random.Random) -> str:
    """One sentence of one of four templates; the verb agrees with the subject (eats / eat)."""
    subj, person = rng.choice(SUBJECTS)
    verb = rng.choice(list(VERBS))
    form = verb + ("s" if person == 3 else "")
    kind = rng.randrange(4)
    if kind == 0:
        words = [subj, form, rng.choice(VERBS[verb]), rng.choice(PLACES)]
    elif kind == 1:
        words = [rng.choice(TIMES).capitalize(), subj, form, rng.choice(VERBS[verb])]
    elif kind == 2:
        noun, adj = rng.choice(WEATHER)
        words = [rng.choice(TIMES).capitalize(), noun, "is", adj]
    else:
        words = [subj, "likes" if person == 3 else "like", rng.choice(["tea", "rain", "music", "mangoes", "books"])]
    text = " ".join(words)
    return text[0].upper() + text[1:] + "."


def main(cfg: EnglishClipsConfig, env: Env) -> dict:
    for tool in ("espeak-ng", "ffmpeg"):
        if shutil.which(tool) is None:
            raise UserError(f"{tool} not found: apt-get install -y espeak-ng ffmpeg")
    out = Path(cfg.out) if cfg.out else env.data_dir / "corpora" / "synth-en"
    if (out / "manifest.csv").exists() and not cfg.force:
        raise UserError(f"{out} already holds clips: pass force=true to replace them, or out=ANOTHER_DIR")
    if out.exists():
        shutil.rmtree(out)
    (out / "clips").mkdir(parents=True)
    rng = random.Random(cfg.seed)
    rows = [{"audio": f"clips/en_{i:05d}.wav", "text": text, "split": cfg.split, "voice": rng.choice(VOICES),
             "speed": rng.randint(140, 180), "pitch": rng.randint(30, 70)}
            for i, text in enumerate(make_sentences(cfg.sentences, rng, random_sentence))]
    with ThreadPoolExecutor(cfg.workers) as pool:
        list(pool.map(lambda r: synthesize(r["text"], r["voice"], r["speed"], r["pitch"], out / r["audio"]), rows))
    seconds = sum(((out / r["audio"]).stat().st_size - 44) / 32_000 for r in rows)  # 16-bit mono 16 kHz
    with open(out / "manifest.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=["audio", "text", "split", "voice", "speed", "pitch"])
        w.writeheader()
        w.writerows(rows)
    log.info("wrote %s/manifest.csv: %d clips, %.1f min", out, len(rows), seconds / 60)
    return {"clips": len(rows), "seconds": round(seconds, 1), "out": str(out)}


if __name__ == "__main__":
    raise SystemExit(run_job("make_english_clips", __doc__, EnglishClipsConfig, main))
