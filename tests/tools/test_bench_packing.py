"""`lib.tools.bench_packing`: the synthetic corpus it plans (the bench's clips=cv corpus on request)."""

from __future__ import annotations

import numpy as np
import pytest

from lib.errors import UserError
from lib.tools import bench_packing as bp


def test_the_bench_corpus_labels_follow_the_durations():
    cfg = bp.Config(clips=4000, clip_median=5, clip_spread=0.4, clip_max=20, tokens_per_second=10)
    stream, seconds, labels = bp.synthetic(cfg)
    assert len(seconds) == len(labels) == 4000 and len(stream.shards) == 2
    assert 4.7 < np.median(seconds) < 5.3 and seconds.min() >= 1 and seconds.max() <= 20
    # prefix (3) + <|notimestamps|> + text + <|eot|>: 10 text tokens a second
    assert np.array_equal(labels, np.maximum(1, np.round(seconds * 10)).astype(np.int64) + 5)
    _, default_seconds, default_labels = bp.synthetic(bp.Config(clips=4000))  # unchanged: 10-120 tokens
    assert 4.3 < np.median(default_seconds) < 4.9 and default_seconds.max() <= 15
    assert default_labels.min() >= 10 and default_labels.max() <= 120


@pytest.mark.parametrize("flags", [{"clip_median": 30, "clip_max": 20}, {"clip_spread": -1},
                                   {"tokens_per_second": -2}, {"clip_median": 0.5}])
def test_a_corpus_it_cannot_draw_names_the_flags(flags):
    with pytest.raises(UserError, match="clip_median=.*tokens_per_second="):
        bp.Config(**flags)
