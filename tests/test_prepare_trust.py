"""Issue 11, data side: prepare must not quietly train on wrong, duplicated or leaked rows."""

from __future__ import annotations

import pytest

from jobs.prepare import PrepareConfig, main
from lib.config import load_config
from lib.env import Env
from lib.prepared import load_split
from tests.test_prepare import CV


def prepare(data_dir, model, *flags):
    cfg = load_config(PrepareConfig, None, [f"model={model}", "num_proc=1", *flags])
    return main(cfg, Env(data_dir=data_dir))


# ---------------------------------------------------------------- item 7: resume with another chunk_rows


@pytest.mark.parametrize("rerun_chunk_rows", [4, 10])
def test_resume_with_another_chunk_rows_neither_duplicates_nor_loses_rows(tiny_model_dir, tmp_path, monkeypatch,
                                                                            rerun_chunk_rows):
    from lib import data as data_mod

    # train.tsv's 5 bad rows are its last; test.tsv's 4 good rows follow them: 21 rows.
    flags = ("source.kind=cv", f"source.path={CV}", "source.train=train+test", "source.validation=", "source.test=")
    whole = prepare(tmp_path / "ref", tiny_model_dir, "name=k", *flags)
    want = sorted(load_split(tmp_path / "ref" / "prepared" / "k", "train")["id"])
    real_call = data_mod.Processor.__call__
    calls = []

    def dies_on_third_chunk(self, batch):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt("killed")
        return real_call(self, batch)

    monkeypatch.setattr(data_mod.Processor, "__call__", dies_on_third_chunk)
    with pytest.raises(KeyboardInterrupt):
        prepare(tmp_path / "data", tiny_model_dir, "name=k", *flags, "chunk_rows=6")  # 6 + 6 rows done
    monkeypatch.setattr(data_mod.Processor, "__call__", real_call)
    after = prepare(tmp_path / "data", tiny_model_dir, "name=k", *flags, f"chunk_rows={rerun_chunk_rows}")
    got = sorted(load_split(tmp_path / "data" / "prepared" / "k", "train")["id"])
    assert got == want and len(set(got)) == len(got)
    assert after["splits"]["train"]["rows"] == whole["splits"]["train"]["rows"]
    assert after["splits"]["train"]["rows_read"] == whole["splits"]["train"]["rows_read"] == 21
    assert after["skipped"] == whole["skipped"]
