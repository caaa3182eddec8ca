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


# ---------------------------------------------------------------- item 13: encodings


def test_latin1_tsv_and_csv_exit_2_naming_file_line_and_encoding(tiny_model_dir, tmp_path, capsys, monkeypatch):
    import shutil

    from lib.cli import run_job
    from tests.test_prepare import MANIFEST_DIR

    monkeypatch.setenv("DATA_DIR", str(tmp_path / "data"))
    src = tmp_path / "cv"
    shutil.copytree(CV, src)
    with open(src / "dev.tsv", "ab") as f:  # one Latin-1 row after four good ones (line 6)
        f.write("client9\tcommon_voice_hi_00001012.mp3\tx\tcaf\xe9 cr\xe8me\t2\t0\t\t\t\t\thi\t\n".encode("latin-1"))
    code = run_job("prepare", "", PrepareConfig, main,
                   [f"model={tiny_model_dir}", "num_proc=1", "source.kind=cv", f"source.path={src}", "name=l1"])
    err = capsys.readouterr().err
    assert code == 2
    assert f"{src / 'dev.tsv'} line 6: not UTF-8 (byte 0xe9" in err and "UnicodeDecodeError" not in err

    csv_file = tmp_path / "m" / "manifest.csv"
    shutil.copytree(MANIFEST_DIR / "clips", tmp_path / "m" / "clips")
    csv_file.write_bytes("audio,text\nclips/en_0.wav,fine\nclips/en_1.wav,na\xefve caf\xe9\n".encode("latin-1"))
    code = run_job("prepare", "", PrepareConfig, main,
                   [f"model={tiny_model_dir}", "num_proc=1", "language=en", "source.kind=manifest",
                    f"source.path={csv_file}", "name=l2"])
    err = capsys.readouterr().err
    assert code == 2 and f"{csv_file} line 3: not UTF-8 (byte 0xef at column 18)" in err


def test_utf8_bom_manifest_and_tsv_are_read(tiny_model_dir, tmp_path):
    import shutil

    from tests.test_prepare import MANIFEST_DIR

    shutil.copytree(MANIFEST_DIR / "clips", tmp_path / "m" / "clips")
    body = (MANIFEST_DIR / "manifest.csv").read_bytes()
    (tmp_path / "m" / "manifest.csv").write_bytes(b"\xef\xbb\xbf" + body)  # Excel's "CSV UTF-8"
    m = prepare(tmp_path / "data", tiny_model_dir, "name=bom", "language=en", "source.kind=manifest",
                f"source.path={tmp_path / 'm' / 'manifest.csv'}")
    assert m["splits"]["train"]["rows"] == 6 and m["splits"]["test"]["rows"] == 2
    src = tmp_path / "cv"
    shutil.copytree(CV, src)
    (src / "test.tsv").write_bytes(b"\xef\xbb\xbf" + (CV / "test.tsv").read_bytes())
    m = prepare(tmp_path / "data", tiny_model_dir, "name=bomcv", "source.kind=cv", f"source.path={src}",
                "source.train=", "source.validation=")
    assert m["splits"]["test"]["rows"] == 4
