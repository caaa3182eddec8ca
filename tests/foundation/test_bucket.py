"""Datasets in a bucket, against a real S3 server: moto's server mode on 127.0.0.1 in this process,
with IAM authentication on (wrong credentials are refused as AWS refuses them), stopped and
started again on the same port while jobs read and write (moto keeps its objects in the process).

prepare writes out=s3://..., train and eval read data=s3://...; a store that goes away is retried
with backoff (logged with the URL and the attempt), then the job exits 75 and a rerun finishes
with the same content; nothing half-written is taken for complete; wrong credentials and a
missing bucket exit 2 naming the URL; no credential reaches a log, a config or an output.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import socket
import threading
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from lib.dataset import bucket
from lib.errors import EXIT_UNAVAILABLE, EXIT_USER_ERROR
from tests.helpers import train_flags

BUCKET = "whisper-data"
SR = 16_000


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Store:
    """moto's S3 server in this process; stop() and start() keep its buckets and objects.

    stop() also closes the connections it has open, as a server process that goes away does: the
    threaded server's shutdown() alone stops accepting but keeps serving kept-alive connections."""

    def __init__(self):
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.server = None
        self.key = self.secret = ""
        self.connections: list[socket.socket] = []

    def start(self) -> None:
        from moto.server import ThreadedMotoServer

        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.server.start()
        http = self.server._server
        accept = http.process_request

        def process_request(request, client_address):
            self.connections.append(request)
            return accept(request, client_address)

        http.process_request = process_request

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None
        for conn in self.connections:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self.connections.clear()

    def client(self):
        """boto3 with the good key: to look at and damage objects behind the jobs' backs."""
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1", aws_access_key_id=self.key,
                            aws_secret_access_key=self.secret)

    def objects(self, prefix: str) -> dict[str, bytes]:
        c = self.client()
        keys = [o["Key"] for o in c.list_objects_v2(Bucket=BUCKET, Prefix=prefix).get("Contents", [])]
        return {k[len(prefix):].lstrip("/"): c.get_object(Bucket=BUCKET, Key=k)["Body"].read() for k in keys}


@pytest.fixture(scope="module")
def s3():
    """The server, an IAM user whose key may do anything, the bucket; then authentication on."""
    import boto3
    from moto import settings

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    store = Store()
    store.start()
    iam = boto3.client("iam", endpoint_url=store.endpoint, region_name="us-east-1", aws_access_key_id="setup",
                       aws_secret_access_key="setup")
    iam.create_user(UserName="whisper")
    iam.put_user_policy(UserName="whisper", PolicyName="all", PolicyDocument=json.dumps(
        {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}))
    key = iam.create_access_key(UserName="whisper")["AccessKey"]
    store.key, store.secret = key["AccessKeyId"], key["SecretAccessKey"]
    store.client().create_bucket(Bucket=BUCKET)
    before_auth = settings.INITIAL_NO_AUTH_ACTION_COUNT
    settings.INITIAL_NO_AUTH_ACTION_COUNT = 0  # from now on every request must be signed by a known key
    with pytest.MonkeyPatch.context() as mp:
        # the jobs' credentials and endpoint: AWS_* variables, as in a pod or a shell
        mp.setenv("AWS_ACCESS_KEY_ID", store.key)
        mp.setenv("AWS_SECRET_ACCESS_KEY", store.secret)
        mp.setenv("AWS_ENDPOINT_URL", store.endpoint)
        mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
        mp.delenv("AWS_SESSION_TOKEN", raising=False)
        mp.delenv("AWS_PROFILE", raising=False)
        mp.setattr(bucket, "BACKOFF_S", 0.05)  # 0.05, 0.1, 0.2, 0.4 s: 0.75 s in all (+ the tries)
        yield store
    settings.INITIAL_NO_AUTH_ACTION_COUNT = before_auth
    store.stop()


@pytest.fixture
def env(s3, tmp_path, monkeypatch):
    """DATA_DIR for the jobs, and the server up again after a test that stopped it."""
    monkeypatch.setenv("DATA_DIR", str(tmp_path / "data"))
    monkeypatch.chdir(tmp_path)  # no .env of the checkout
    if s3.server is None:
        s3.start()
    yield tmp_path / "data"
    if s3.server is None:
        s3.start()


def clip(seconds: float, freq: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SR)) / SR
    return (0.3 * np.sin(2 * np.pi * freq * t) + 0.01 * rng.standard_normal(t.size)).astype(np.float32)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """12 wav clips in a manifest: 6 train, 2 validation, 4 test. Train clip 5 is 0.3 s with a long
    transcript: the speaking-rate check drops it once every chunk is done, which rewrites its shard."""
    root = tmp_path_factory.mktemp("corpus")
    (root / "clips").mkdir()
    with open(root / "manifest.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["audio", "text", "split"])
        for i in range(12):
            fast = i == 5
            sf.write(root / f"clips/c{i}.wav", clip(0.3 if fast else 0.6 + 0.1 * (i % 3), 200 + 40 * i, i), SR,
                     subtype="PCM_16")
            text = " ".join(["many words"] * 10) if fast else f"sentence number {i}"
            w.writerow([f"clips/c{i}.wav", text, "train" if i < 6 else "validation" if i < 8 else "test"])
    return root / "manifest.csv"


def prepare_args(model, corpus, out: str, *extra: str) -> list[str]:
    return [f"model={model}", "num_proc=1", "data=ds", "language=en", "source.kind=manifest",
            f"source.path={corpus}", "chunk_rows=2", "validation_fraction=0", f"out={out}", *extra]


def job(run, args: list[str]) -> int:
    """A job through its real entry point (run_job: flags, env, exit code), in this process. run_job
    points the root logger at the stderr of the moment; it is put back after, so that a later log
    line does not go to a capture that pytest has closed."""
    root = logging.getLogger()
    handlers = root.handlers[:]
    try:
        return run(args)
    finally:
        root.handlers[:] = handlers


def prepare(args: list[str]) -> int:
    from jobs.prepare import PrepareConfig, __doc__, main
    from lib.cli import run_job

    return job(lambda a: run_job("prepare", __doc__, PrepareConfig, main, a), args)


def train(args: list[str]) -> int:
    from jobs.train import cli

    return job(cli, args)


def evaluate(args: list[str]) -> int:
    """eval without its slow extras (no-speech clips, long-form): the data path is what is tested"""
    from jobs.eval import EvalConfig, __doc__, main
    from lib.cli import run_job

    return job(lambda a: run_job("eval", __doc__, EvalConfig, main, a),
               [*args, "no_speech_clips=0", "longform.recordings=0", "max_new_tokens=4", "compare_base=false"])


def rows_of(objects: dict[str, bytes]) -> dict[str, list[tuple]]:
    """A prepared dataset's rows per split, from its objects, in the order its manifest lists them."""
    import io

    import pyarrow.parquet as pq

    m = json.loads(objects["manifest.json"])
    return {split: [(r["id"], r["text"], tuple(r["labels"]), r["audio"]) for sh in info["shards"]
                    for r in pq.read_table(io.BytesIO(objects[sh["file"]])).to_pylist()]
            for split, info in m["splits"].items()}


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_model_dir, corpus):
    """The same corpus prepared on disk: (its rows, its fingerprint), what every bucket prepare must hold."""
    from jobs.prepare import PrepareConfig, main
    from lib.config import load_config
    from lib.env import Env

    data = tmp_path_factory.mktemp("ref")
    out = data / "elsewhere" / "ds"  # out= a folder: the same job as DATA_DIR/prepared/DATA, somewhere else
    main(load_config(PrepareConfig, None, prepare_args(tiny_model_dir, corpus, str(out))), Env(data_dir=data))
    assert sorted(p.name for p in out.parent.iterdir()) == ["ds"] and not (data / "prepared").exists()
    objects = {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    return rows_of(objects), json.loads(objects["manifest.json"])["fingerprint"]


@pytest.fixture(scope="module")
def in_bucket(s3, tiny_model_dir, corpus, tmp_path_factory):
    """The corpus prepared into the bucket once (out=s3://...): (URL, its objects, prepare's log)."""
    import contextlib
    import io

    url = f"s3://{BUCKET}/through/ds"
    err = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stderr(err):
        mp.setenv("DATA_DIR", str(tmp_path_factory.mktemp("prep") / "data"))
        assert prepare(prepare_args(tiny_model_dir, corpus, url)) == 0
    return url, s3.objects("through/ds"), err.getvalue()


def no_secret(s3, *texts: str) -> None:
    for text in texts:
        assert s3.secret not in text and s3.key not in text


def files_text(root: Path) -> str:
    return "\n".join(p.read_bytes().decode("utf-8", "replace") for p in root.rglob("*") if p.is_file())


# ---------------------------------------------------------------- the way through


def test_prepare_to_a_bucket_then_train_and_eval_from_it(s3, env, tiny_model_dir, in_bucket, reference, monkeypatch,
                                                        capsys):
    """prepare (the in_bucket fixture) into the bucket, train from it, then eval from it while the
    server goes away in the middle of reading the test split and comes back 0.8 s later."""
    import s3fs

    url, objects, out = in_bucket
    m = json.loads(objects["manifest.json"])
    # the contract as on disk: the manifest and its shards, nothing else (markers gone), same rows
    assert sorted(objects) == sorted(["manifest.json", *(sh["file"] for i in m["splits"].values()
                                                          for sh in i["shards"])])
    assert rows_of(objects) == reference[0]
    assert m["fingerprint"] == reference[1]  # where it goes is no part of what it holds
    assert m["skipped_by_reason"] == {"speech too fast": 1} and m["splits"]["train"]["rows"] == 5
    assert m["config"]["out"] == url and f"DATA={url}" in out
    assert "prepare: wrote s3://whisper-data/through/ds" in out
    assert "Found credentials" not in out  # botocore's INFO line for each client (lib/quiet.py)

    assert train(train_flags(tiny_model_dir, "from-s3", data=url, **{"train.max_steps": 2, "train.eval_steps": 2,
                                                                     "train.save_steps": 2})) == 0
    log = capsys.readouterr().err
    run = env / "runs" / "from-s3"
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    assert f"data: {url}" in (run / "config.yaml").read_text()

    # the 2nd ranged read of a shard (the test split's second): the server is gone mid-way
    seen = stop_after(s3, monkeypatch, s3fs.core.S3File, "_fetch_range", 2, restart_after=0.8)
    assert evaluate(["run=from-s3", f"data={url}", "batch_size=4"]) == 0
    report = json.loads((run / "eval" / "report.json").read_text())
    assert report["counts"]["utterances"] == 4 and report["data"] == url
    err = capsys.readouterr().err
    assert seen["n"] > 2 and "storage: s3://whisper-data/through/ds/test/shard-" in err
    assert ": read the shard failed (attempt 1 of 5: EndpointConnectionError" in err
    log += err
    no_secret(s3, out, log, files_text(env), *(v.decode("utf-8", "replace") for v in objects.values()))


# ---------------------------------------------------------------- the store goes away


def stop_after(s3, mp: pytest.MonkeyPatch, owner, name: str, calls: int, restart_after: float | None):
    """Wrap owner.name: on its `calls`-th call the server stops (before the call runs); it starts
    again `restart_after` seconds later (None: it stays down until the test starts it)."""
    real = getattr(owner, name)
    seen = {"n": 0}

    def wrapped(*a, **kw):
        seen["n"] += 1
        if seen["n"] == calls:
            s3.stop()
            if restart_after is not None:
                threading.Timer(restart_after, s3.start).start()
        return real(*a, **kw)

    mp.setattr(owner, name, wrapped)
    return seen


def test_a_store_that_stays_down_exits_75_and_the_rerun_finishes(s3, env, tiny_model_dir, in_bucket, capsys):
    import s3fs

    url = in_bucket[0]
    args = [f"model={tiny_model_dir}", f"data={url}", "out=down"]
    with pytest.MonkeyPatch.context() as mp:
        stop_after(s3, mp, s3fs.core.S3File, "_fetch_range", 1, restart_after=None)
        assert evaluate(args) == EXIT_UNAVAILABLE
    err = capsys.readouterr().err
    assert "failed (attempt 4 of 5" in err and "unavailable: s3://whisper-data/through/ds/test/shard-" in err
    assert "after 5 attempts" in err and "Traceback" not in err
    assert not (env.parent / "down" / "report.json").exists()
    # train too: its first read of the data (the validation split) exits 75, before any step
    assert train(train_flags(tiny_model_dir, "down", data=url)) == EXIT_UNAVAILABLE
    assert "unavailable: s3://whisper-data/through/ds" in capsys.readouterr().err
    s3.start()
    assert evaluate(args) == 0
    assert json.loads((env.parent / "down" / "report.json").read_text())["counts"]["utterances"] == 4
    no_secret(s3, err, capsys.readouterr().err)


def test_prepare_stopped_between_a_shard_and_its_marker_never_counts_it_and_the_rerun_completes(
        s3, env, tiny_model_dir, corpus, reference, monkeypatch, capsys):
    """The server goes away after the 3rd shard's upload, before its marker: exit 75, no manifest.
    The rerun (same process: s3fs must not answer from a cache) finishes with the reference's rows.
    Then a shard is damaged in the bucket (another size than its marker says) and the markers of a
    finished dataset are put back: a rerun of the unfinished dataset redoes that shard."""
    from lib.prepare import upload as up

    url = f"s3://{BUCKET}/write/ds"
    with pytest.MonkeyPatch.context() as mp:
        seen = stop_after(s3, mp, up.bucket, "write_bytes", 3, restart_after=None)
        assert prepare(prepare_args(tiny_model_dir, corpus, url)) == EXIT_UNAVAILABLE
    err = capsys.readouterr().err
    assert seen["n"] == 3 and "unavailable: s3://whisper-data/write/ds/" in err and ".shard-" in err
    s3.start()
    left = s3.objects("write/ds")
    assert "manifest.json" not in left
    shards_up = sorted(k for k in left if k.endswith(".parquet"))
    markers = sorted(k for k in left if k.endswith(".json"))
    assert len(shards_up) == 3 and len(markers) == 2  # the 3rd shard is there without its marker
    # A damaged shard under its name with its marker: an object store never shows a half-uploaded
    # object, but a copy tool or a hand can leave one; its size differs from the marker's.
    second = "train/shard-000000002-000000004.parquet"
    s3.client().put_object(Bucket=BUCKET, Key=f"write/ds/{second}", Body=left[second][: len(left[second]) // 2])

    # the rerun, in the same process: what it sees of the bucket is the bucket now (no cached listing)
    assert prepare(prepare_args(tiny_model_dir, corpus, url)) == 0
    log = capsys.readouterr().err
    assert "train rows 4-5 was finished here before the upload; uploaded it" in log
    assert "6 for this index: 2 already done, 4 to do" in log  # rows 0-1, and 4-5 just uploaded
    assert rows_of(s3.objects("write/ds")) == reference[0]
    no_secret(s3, err, log)


def test_a_write_while_the_store_restarts_is_retried(s3, env, tiny_model_dir, corpus, reference, monkeypatch,
                                                     capsys):
    from lib.prepare import upload as up

    url = f"s3://{BUCKET}/write-restart/ds"
    stop_after(s3, monkeypatch, up.bucket, "upload", 2, restart_after=0.8)
    assert prepare(prepare_args(tiny_model_dir, corpus, url)) == 0
    log = capsys.readouterr().err
    assert "storage: s3://whisper-data/write-restart/ds/train/shard-000000002-000000004.parquet: upload" in log
    assert "(attempt 1 of 5" in log
    assert rows_of(s3.objects("write-restart/ds")) == reference[0]


def test_indexed_job_indexes_share_the_bucket_and_the_last_writes_the_manifest(s3, env, tiny_model_dir, corpus,
                                                                                reference, capsys):
    """shard_count=2 as two pods of an Indexed Job, each with its own DATA_DIR (no shared volume):
    index 1 uploads its chunks and exits 0 without a manifest; index 0 uploads the rest, finds every
    marker in the bucket and writes the manifest."""
    url = f"s3://{BUCKET}/indexed/ds"
    os.environ["DATA_DIR"] = str(env / "pod1")
    assert prepare(prepare_args(tiny_model_dir, corpus, url, "shard_count=2", "shard_index=1")) == 0
    log1 = capsys.readouterr().err
    left = s3.objects("indexed/ds")
    assert "manifest.json" not in left and "the index that finishes last writes the manifest" in log1
    assert sorted(k for k in left if k.endswith(".parquet")) == [  # chunks 1, 3, 5 of the plan
        "test/shard-000000002-000000004.parquet", "train/shard-000000002-000000004.parquet",
        "validation/shard-000000000-000000002.parquet"]
    os.environ["DATA_DIR"] = str(env / "pod0")
    assert prepare(prepare_args(tiny_model_dir, corpus, url, "shard_count=2", "shard_index=0")) == 0
    objects = s3.objects("indexed/ds")
    m = json.loads(objects["manifest.json"])
    assert m["prepared_by"]["finished_by_index"] == 0 and rows_of(objects) == reference[0]
    assert not any(k.endswith(".json") and k != "manifest.json" for k in objects)  # markers gone


# ---------------------------------------------------------------- what exits 2


def test_wrong_credentials_and_a_missing_bucket_exit_2_naming_the_url(s3, env, tiny_model_dir, corpus,
                                                                      monkeypatch, capsys):
    url = f"s3://{BUCKET}/creds/ds"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret-value-123")
    assert prepare(prepare_args(tiny_model_dir, corpus, url)) == EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert f"out={url}" in err or url in err
    assert "access denied" in err and "AWS_SECRET_ACCESS_KEY" in err and "wrong-secret-value-123" not in err
    assert "attempt" not in err  # not retried
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "fake-key-id-unknown")
    assert train(train_flags(tiny_model_dir, "creds", data=url)) == EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert f"s3://{BUCKET}/creds/ds" in err and "access denied" in err

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3.key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3.secret)
    missing = "s3://no-such-bucket-here/prepared/ds"
    assert prepare(prepare_args(tiny_model_dir, corpus, missing)) == EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert f"out={missing}" in err and "does not exist" in err
    assert train(train_flags(tiny_model_dir, "nobucket", data=missing)) == EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert f"data={missing}" in err and "does not exist" in err
    assert evaluate([f"model={tiny_model_dir}", f"data={missing}"]) == EXIT_USER_ERROR
    assert "does not exist" in capsys.readouterr().err
    # an existing bucket without a finished dataset there
    assert evaluate([f"model={tiny_model_dir}", f"data=s3://{BUCKET}/nothing/here"]) == EXIT_USER_ERROR
    assert "no manifest.json at that URL" in capsys.readouterr().err


URL_USER, URL_PASSWORD = "fake-user-in-url", "fake-password-in-url"
"""made-up credentials (not shaped like real keys, so no scanner takes them for one)"""


def test_credentials_in_a_url_are_refused_and_never_printed(s3, env, tiny_model_dir, corpus, capsys):
    url = f"s3://{URL_USER}:{URL_PASSWORD}@{BUCKET}/x"
    assert prepare(prepare_args(tiny_model_dir, corpus, url)) == EXIT_USER_ERROR
    assert train(train_flags(tiny_model_dir, "inurl", data=url)) == EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert err.count("carries credentials") == 2 and f"s3://{BUCKET}/x" in err
    written = files_text(env) if env.exists() else ""
    for text in (err, written):
        assert URL_PASSWORD not in text and URL_USER not in text


def test_env_file_credentials_reach_the_driver_and_are_masked(s3, tmp_path, monkeypatch):
    from lib.env import load_env

    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(k, raising=False)
    f = tmp_path / "x.env"
    f.write_text(f"AWS_ACCESS_KEY_ID={s3.key}\nAWS_SECRET_ACCESS_KEY={s3.secret}\n"
                 f"AWS_ENDPOINT_URL=http://user:pw@127.0.0.1:{s3.port}\n")
    e = load_env(f)
    assert os.environ["AWS_SECRET_ACCESS_KEY"] == s3.secret and s3.secret in e.secrets()
    text = str(e.describe()) + repr(e)
    assert s3.secret not in text and s3.key not in text and "pw@" not in text
    assert "AWS_SECRET_ACCESS_KEY set" in text and f"AWS_ENDPOINT_URL=http://127.0.0.1:{s3.port}" in text


def _read_in_child(url, q):
    from lib.dataset import shards

    try:
        q.put(shards.read_shard(url, columns=["id"]).num_rows)
    except Exception as e:  # noqa: BLE001 - the test reports what the child met
        q.put(repr(e))


def test_a_forked_loader_worker_reads_the_bucket_the_parent_opened(s3, env, in_bucket):
    """A DataLoader worker is forked after the main process read the manifest: s3fs filesystems are
    not fork-safe, so the worker must make its own, not use the parent's."""
    import multiprocessing

    from lib.dataset import shards

    url, objects, _ = in_bucket
    shard = json.loads(objects["manifest.json"])["splits"]["test"]["shards"][0]
    assert shards.read_shard(f"{url}/{shard['file']}", columns=["id"]).num_rows == shard["rows"]  # parent first
    ctx = multiprocessing.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=_read_in_child, args=(f"{url}/{shard['file']}", q))
    p.start()
    got = q.get(timeout=60)
    p.join(timeout=60)
    assert got == shard["rows"]


def test_what_each_failure_means(monkeypatch, caplog):
    """Without a server: which errors are retried (and logged), which exit 2, which pass through;
    a URL as it is printed."""
    import errno

    from botocore.exceptions import EndpointConnectionError, NoCredentialsError

    from lib.errors import Unavailable, UserError

    monkeypatch.setattr(bucket, "BACKOFF_S", 0.0)
    url = "s3://b/prefix/x.parquet"

    def failing(e):
        tries = []

        def fn():
            tries.append(1)
            raise e
        return fn, tries

    for e in (EndpointConnectionError(endpoint_url="http://x"), OSError(errno.EREMOTEIO, "InternalError"),
              TimeoutError("read timed out")):
        fn, tries = failing(e)
        with pytest.raises(Unavailable, match="s3://b/prefix/x.parquet: could not read it after 5 attempts"):
            bucket.call(url, "read it", fn)
        assert len(tries) == bucket.ATTEMPTS
    assert "storage: s3://b/prefix/x.parquet: read it failed (attempt 4 of 5" in caplog.text
    for e in (PermissionError("Forbidden"), NoCredentialsError()):
        fn, tries = failing(e)
        with pytest.raises(UserError, match="s3://b/prefix/x.parquet: access denied") as got:
            bucket.call(url, "read it", fn)
        assert len(tries) == 1 and "AWS_SECRET_ACCESS_KEY" in str(got.value)
    for e in (FileNotFoundError("no such key"), ValueError("not a parquet file")):
        fn, tries = failing(e)
        with pytest.raises(type(e)):
            bucket.call(url, "read it", fn)
        assert len(tries) == 1
    fn, tries = failing(ConnectionError("refused"))
    with pytest.raises(ConnectionError):
        bucket.call("/a/local/path", "read it", fn)  # not a bucket: nothing to retry
    assert bucket.redact("s3://someuser:somepassword@b/p?X-Amz-Signature=abc") == "s3://b/p"
    with pytest.raises(UserError, match=r"out=s3://b/p: the URL carries credentials") as got:
        bucket.check_url("s3://someuser:somepassword@b/p", "out")
    assert "somepassword" not in str(got.value) and "someuser" not in str(got.value)


def test_what_another_writer_did_is_seen_at_once(s3, env):
    """Another process (another index, a rerun after a kill, a hand) changes the bucket between two
    looks of this one: no listing or filesystem cached in this process may hide it."""
    url = f"s3://{BUCKET}/seen/split"
    c = s3.client()
    c.put_object(Bucket=BUCKET, Key="seen/split/a", Body=b"12345")
    assert bucket.sizes(url) == {"a": 5}
    c.put_object(Bucket=BUCKET, Key="seen/split/a", Body=b"123")
    c.put_object(Bucket=BUCKET, Key="seen/split/b", Body=b"1")
    assert bucket.sizes(url) == {"a": 3, "b": 1}
    c.delete_object(Bucket=BUCKET, Key="seen/split/a")
    assert bucket.sizes(url) == {"b": 1}
    assert bucket.read_bytes(f"{url}/b") == b"1"
