"""`data=`: which prepared corpora a job reads, and with what weights; parsed here and only here.

    data=cv_hi                          one corpus
    data=cv_hi:0.7,fleurs_hi:0.3        a mixture, sampled 70/30 (lib.train.stream.Mixture)
    data=cv_hi,fleurs_hi                a mixture in proportion to their rows
    data=s3://bucket/prepared/cv_hi     a URL or a folder instead of a prepared name

A config with a `data=` field (train's, eval's, export's) inherits DataFlag: its corpora() is the
one place `data=` becomes a list of Corpus, and every job reads that. Nothing here imports torch:
a config check parses `data=` for free.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from lib.dataset.bucket import check_url
from lib.errors import UserError


@dataclass(frozen=True)
class Corpus:
    name: str
    """as given: a prepared name, a folder or a URL"""
    weight: float | None
    label: str = ""
    """how logs and metrics name it (eval_<label>_wer): the name, or a path's or URL's last part"""


def parse_data(data: str) -> list[Corpus]:
    """`data=` as a list: "cv_hi" (one corpus), "cv_hi:0.7,fleurs_hi:0.3" (weights), "a,b" (no
    weights: sampled in proportion to their rows, one pass over each per epoch). URLs may hold
    ':' (s3://...): a weight is only a trailing ':<number>'."""
    if not data or not data.strip():
        raise UserError("data= is empty: name a prepared dataset (data=cv_hi) or several (data=cv_hi:0.7,fleurs_hi:0.3)")
    out = []
    for part in (p.strip() for p in data.split(",")):
        if not part:
            raise UserError(f"data={data}: an empty name between commas")
        check_url(part, "data")  # credentials in a URL would reach the resolved config and the logs
        name, weight = part, None
        head, sep, tail = part.rpartition(":")
        if sep and head and not tail.startswith("//"):
            try:
                weight = float(tail)
            except ValueError:
                raise UserError(f"data={data}: '{tail}' after '{head}:' is not a weight; write name:0.7") from None
            name = head
            if not (math.isfinite(weight) and weight > 0):  # inf, nan and 0 mix nothing sensible
                raise UserError(f"data={data}: the weight of {name} is {tail}; weights must be > 0 and finite")
        out.append(Corpus(name, weight))
    names = [c.name for c in out]
    if len(set(names)) < len(names):
        raise UserError(f"data={data}: a corpus is listed twice")
    labels = [c.name.rstrip("/").rsplit("/", 1)[-1] or c.name for c in out]
    if len(set(labels)) < len(labels):
        labels = names
    out = [Corpus(c.name, c.weight, label) for c, label in zip(out, labels, strict=True)]
    given = [c.weight is not None for c in out]
    if any(given) and not all(given):
        raise UserError(f"data={data}: give every corpus a weight (a:0.7,b:0.3) or none (a,b)")
    return out


class DataFlag:
    """What a config with a `data=` field (TrainConfig, EvalConfig, ExportConfig) knows of it: its
    corpora, parsed here, the one place `data=` is parsed (tests/house/test_structure.py checks it)."""

    def corpora(self, default: str | None = None) -> list[Corpus]:
        """`data=` as typed corpora (parse_data); `default`: what data= means when it is unset
        (eval and export: the run's config.yaml data)."""
        return parse_data(self.data or default or "")
