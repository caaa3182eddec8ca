"""Synthesize a small Hindi speech corpus with espeak-ng, for realistic end-to-end runs without a download.

    apt-get install -y espeak-ng ffmpeg
    DATA_DIR=data python -m lib.tools.make_synthetic_corpus            # -> data/corpora/synth-hi
    python -m lib.tools.make_synthetic_corpus out=/tmp/synth-hi sentences=300 seed=1
    DATA_DIR=data python -m jobs.prepare data=synth-hi language=hi source.kind=manifest \
        source.path=data/corpora/synth-hi/manifest.csv model=openai/whisper-base   # or a local copy

Builds SENTENCES distinct short Hindi sentences (3-8 words, Devanagari) from a small
vocabulary and a few templates (subject, object, verb agreeing with the subject's gender,
place, time), speaks each once with a random espeak-ng Hindi voice variant, speed and
pitch, and writes OUT/clips/*.wav (16 kHz mono) plus OUT/manifest.csv (audio,text,split).
Splits are by sentence, so a test sentence is never heard in training; every split uses
the same vocabulary (the job logs any test word that no training sentence contains).
Same seed and config -> the same corpus. An OUT that already holds a manifest is kept
unless force=true.
"""

from __future__ import annotations

import csv
import json
import logging
import random
import shutil
import subprocess
import time
import unicodedata
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from lib.cli import run_job
from lib.config import to_dict
from lib.env import Env
from lib.errors import UserError

log = logging.getLogger("whisper_ft")

# Vocabulary. Subjects carry a gender: Hindi verbs agree with it (खाता है / खाती है).
SUBJECTS = [("राम", "m"), ("सीता", "f"), ("मोहन", "m"), ("गीता", "f"), ("मेरा भाई", "m"),
            ("मेरी बहन", "f"), ("वह लड़का", "m"), ("वह लड़की", "f"), ("किसान", "m"), ("माँ", "f"),
            ("पिताजी", "m"), ("दादी", "f")]
# verb stem -> objects it takes; the form is stem + ता/ती है.
VERBS = {
    "खा": ["सेब", "केला", "रोटी", "चावल", "आम", "खाना"],
    "पी": ["पानी", "दूध", "चाय"],
    "पढ़": ["किताब", "अख़बार", "कहानी", "चिट्ठी"],
    "खरीद": ["सेब", "किताब", "कपड़े", "सब्ज़ी", "दूध", "फूल"],
    "देख": ["फ़िल्म", "पेड़", "बादल", "तस्वीर", "फूल"],
    "बेच": ["फल", "सब्ज़ी", "कपड़े", "दूध"],
    "ला": ["पानी", "फूल", "किताब", "खाना"],
}
PLACES = ["बाज़ार", "घर", "स्कूल", "दुकान", "गाँव", "शहर", "पार्क", "दफ़्तर"]
TIMES = ["आज", "कल", "सुबह", "शाम को", "रोज़", "रात को"]
LIKES = ["चाय", "दूध", "आम", "किताब", "बारिश", "गाना", "खाना", "फूल"]
ADJ_NOUN = [("मौसम", "अच्छा"), ("पानी", "ठंडा"), ("खाना", "गरम"), ("आसमान", "नीला"), ("घर", "बड़ा"),
            ("बाज़ार", "बंद"), ("दुकान", "खुली"), ("सड़क", "लंबी")]

# espeak-ng Hindi with its male/female variants (hi+m1 ... hi+f4); speed in words/min, pitch 0-99.
VOICES = ["hi", "hi+m1", "hi+m3", "hi+m5", "hi+f2", "hi+f3", "hi+f4"]


@dataclass
class CorpusConfig:
    """`make_synthetic_corpus`: how many sentences, which splits, where."""

    out: str | None = None
    """output folder (default DATA_DIR/corpora/synth-hi); keep it outside the repo"""
    sentences: int = 540
    """distinct sentences = clips (one clip each); ~2.5 s a clip -> 540 clips ~ 20 min of audio"""
    validation: int = 60
    """sentences held out for validation (the train job's WER evals)"""
    test: int = 60
    """sentences held out for test (never heard in training); the rest train"""
    speed_min: int = 140
    """espeak-ng -s lower bound (words per minute)"""
    speed_max: int = 180
    """espeak-ng -s upper bound"""
    pitch_min: int = 30
    """espeak-ng -p lower bound (0-99)"""
    pitch_max: int = 70
    """espeak-ng -p upper bound"""
    seed: int = 0
    """sentences, split assignment, voices, speeds and pitches all follow it"""
    workers: int = 2
    """espeak-ng + ffmpeg processes at a time: about one per core"""
    force: bool = False
    """replace a corpus already in OUT"""

    def __post_init__(self):
        if self.validation < 1 or self.test < 1 or self.sentences - self.validation - self.test < 1:
            raise UserError(f"sentences={self.sentences}, validation={self.validation}, test={self.test}: "
                            "need at least one sentence in each split (raise sentences=)")
        if not (80 <= self.speed_min <= self.speed_max <= 450):
            raise UserError("speed_min/speed_max: need 80 <= speed_min <= speed_max <= 450 (espeak-ng -s)")
        if not (0 <= self.pitch_min <= self.pitch_max <= 99):
            raise UserError("pitch_min/pitch_max: need 0 <= pitch_min <= pitch_max <= 99 (espeak-ng -p)")
        if self.workers < 1:
            raise UserError("workers must be >= 1")


def _verb(stem: str, gender: str) -> str:
    return f"{stem}{'ता' if gender == 'm' else 'ती'} है"


def random_sentence(rng: random.Random) -> str:
    """One sentence from one of five templates (3-8 words)."""
    subj, g = rng.choice(SUBJECTS)
    stem = rng.choice(list(VERBS))
    obj = rng.choice(VERBS[stem])
    kind = rng.randrange(5)
    if kind == 0:    # आज राम बाज़ार में सेब खरीदता है
        words = [rng.choice(TIMES), subj, rng.choice(PLACES), "में", obj, _verb(stem, g)]
    elif kind == 1:  # सीता चाय पीती है
        words = [subj, obj, _verb(stem, g)]
    elif kind == 2:  # शाम को मोहन पार्क जाता है
        words = [rng.choice(TIMES), subj, rng.choice(PLACES), _verb("जा", g)]
    elif kind == 3:  # गीता को बारिश पसंद है
        words = [subj, "को", rng.choice(LIKES), "पसंद है"]
    else:            # आज शहर में मौसम अच्छा है
        noun, adj = rng.choice(ADJ_NOUN)
        words = [rng.choice(TIMES), rng.choice(PLACES), "में", noun, adj, "है"]
    # NFC: one spelling of each nukta letter (ज़ vs ज + ़) in labels and metrics.
    return unicodedata.normalize("NFC", " ".join(words))


def make_sentences(n: int, rng: random.Random, sentence=random_sentence) -> list[str]:
    """n distinct sentences of `sentence(rng)` (this corpus's Hindi templates by default), in draw order."""
    seen: dict[str, None] = {}
    for _ in range(200 * n):
        if len(seen) == n:
            return list(seen)
        seen.setdefault(sentence(rng), None)
    raise UserError(f"sentences={n}: the vocabulary gives only {len(seen)} distinct sentences; lower sentences=")


def synthesize(text: str, voice: str, speed: int, pitch: int, out: Path) -> None:
    """espeak-ng (22.05 kHz wav on stdout) -> ffmpeg -> 16 kHz mono 16-bit wav."""
    speech = subprocess.run(["espeak-ng", "-v", voice, "-s", str(speed), "-p", str(pitch), "--stdout", text],
                            check=True, capture_output=True).stdout
    subprocess.run(["ffmpeg", "-loglevel", "error", "-y", "-f", "wav", "-i", "pipe:0", "-ac", "1", "-ar", "16000",
                    "-c:a", "pcm_s16le", str(out)], input=speech, check=True, capture_output=True)


def main(cfg: CorpusConfig, env: Env) -> dict:
    # 1. Tools and output folder.
    for tool in ("espeak-ng", "ffmpeg"):
        if shutil.which(tool) is None:
            raise UserError(f"{tool} not found: apt-get install -y espeak-ng ffmpeg")
    if "hi" not in subprocess.run(["espeak-ng", "--voices=hi"], capture_output=True, text=True).stdout:
        raise UserError("espeak-ng has no Hindi voice (espeak-ng --voices=hi): install the full espeak-ng-data")
    out = Path(cfg.out) if cfg.out else env.data_dir / "corpora" / "synth-hi"
    if (out / "manifest.csv").exists() and not cfg.force:
        raise UserError(f"{out} already holds a corpus: pass force=true to replace it, or out=ANOTHER_DIR")
    if out.exists():
        shutil.rmtree(out)
    (out / "clips").mkdir(parents=True)

    # 2. Sentences and splits, all from the seed.
    rng = random.Random(cfg.seed)
    sentences = make_sentences(cfg.sentences, rng)
    rng.shuffle(sentences)
    n_val, n_test = cfg.validation, cfg.test
    split_of = ["test"] * n_test + ["validation"] * n_val + ["train"] * (len(sentences) - n_val - n_test)
    rows = []
    for i, (text, split) in enumerate(zip(sentences, split_of, strict=True)):
        rows.append({"audio": f"clips/{split}_{i:05d}.wav", "text": text, "split": split,
                     "voice": rng.choice(VOICES), "speed": rng.randint(cfg.speed_min, cfg.speed_max),
                     "pitch": rng.randint(cfg.pitch_min, cfg.pitch_max)})
    train_words = {w for r in rows if r["split"] == "train" for w in r["text"].split()}
    unseen = sorted({w for r in rows if r["split"] != "train" for w in r["text"].split()} - train_words)
    if unseen:
        log.warning("held-out words no training sentence contains: %s", " ".join(unseen))
    log.info("config: %s", to_dict(cfg))
    log.info("%d sentences: %s; vocabulary %d words", len(rows),
             {s: split_of.count(s) for s in ("train", "validation", "test")}, len(train_words))

    # 3. Speak them (espeak-ng is ~20 ms a clip; ffmpeg start-up dominates).
    t0 = time.time()
    with ThreadPoolExecutor(cfg.workers) as pool:
        list(pool.map(lambda r: synthesize(r["text"], r["voice"], r["speed"], r["pitch"], out / r["audio"]), rows))
    # 16-bit mono at 16 kHz: 32,000 bytes a second after the 44-byte header.
    seconds = sum(((out / r["audio"]).stat().st_size - 44) / 32_000 for r in rows)

    # 4. Manifest (the prepare job's manifest source) and a summary.
    with open(out / "manifest.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=["audio", "text", "split", "voice", "speed", "pitch"])
        w.writeheader()
        w.writerows(rows)
    summary = {"clips": len(rows), "hours": round(seconds / 3600, 3), "mean_seconds": round(seconds / len(rows), 2),
               "splits": {s: split_of.count(s) for s in ("train", "validation", "test")},
               "vocabulary": len(train_words), "unseen_test_words": unseen, "config": to_dict(cfg),
               "synthesis_seconds": round(time.time() - t0, 1)}
    (out / "corpus.json").write_text(json.dumps(summary, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    log.info("wrote %s/manifest.csv: %d clips, %.2f h (%.1f s a clip) in %.0f s", out, len(rows),
             seconds / 3600, seconds / len(rows), time.time() - t0)
    return summary


if __name__ == "__main__":
    raise SystemExit(run_job("make_synthetic_corpus", __doc__, CorpusConfig, main))
