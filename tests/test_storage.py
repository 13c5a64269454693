"""The storage layer against a real S3 server on loopback (moto), with faults injected by a proxy in front of it.

    pytest tests/test_storage.py
"""

from __future__ import annotations

import random
import threading
import time
from pathlib import Path

import pytest
from s3_server import FaultProxy, free_port

import lfqa.storage
from lfqa.storage import (
    BackgroundUploader,
    LocalStore,
    MiB,
    S3Store,
    StorageError,
    open_store,
    parse_s3_uri,
    stage_s3_uri,
)

MARKER = "COMPLETE"


def make_tree(root: Path, seed: int = 0, big: int = 0) -> dict[str, bytes]:
    """A checkpoint-like folder: nested files, an empty one, optionally a big one, and the marker."""
    rng = random.Random(seed)
    files = {"config.json": b'{"step": %d}' % seed, "empty.txt": b"", "sub/optimizer.bin": rng.randbytes(70_000),
             "sub/deeper/rng_state.pt": rng.randbytes(1000), MARKER: b"done"}
    if big:
        files["model.safetensors"] = rng.randbytes(big)
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return files


def read_tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def assert_clean_message(exc: StorageError, *must_contain: str, secrets: tuple[str, ...] = ()) -> str:
    message = str(exc)
    assert "\n" not in message, message
    for text in must_contain:
        assert text in message, (text, message)
    for secret in secrets:
        assert secret not in message, message
    return message


@pytest.mark.parametrize("uri, expected", [
    ("s3://bucket", ("bucket", "")),
    ("s3://bucket/", ("bucket", "")),
    ("s3://my.bucket-1/runs/a/", ("my.bucket-1", "runs/a")),
])
def test_parse_s3_uri(uri, expected):
    assert parse_s3_uri(uri) == expected


@pytest.mark.parametrize("uri", ["bucket/x", "s3:/bucket", "s3://", "s3:///x", "s3://b c/x", "s3://bucket/a//b",
                                 "s3://bucket/../x", "http://bucket/x", "s3://ab"])
def test_parse_s3_uri_rejects(uri):
    with pytest.raises(StorageError, match="URI|bucket"):
        parse_s3_uri(uri)


def test_open_store(s3_env, tmp_path):
    assert isinstance(open_store("s3://bucket/run"), S3Store)
    assert isinstance(open_store(tmp_path / "store"), LocalStore)
    with pytest.raises(StorageError, match="gs://"):
        open_store("gs://bucket/run")


@pytest.fixture(params=["local", "moto", "seaweedfs"])
def store(request, tmp_path):
    if request.param == "local":
        return LocalStore(tmp_path / "store")
    request.getfixturevalue("s3_env")
    server = request.getfixturevalue(f"{request.param}_server")
    return S3Store(f"s3://{server.make_bucket()}/runs/x", endpoint_url=server.endpoint)


def test_store_round_trip(store, tmp_path):
    files = make_tree(tmp_path / "src")
    store.check()
    assert store.upload_dir(tmp_path / "src", "checkpoints/step-00000010", marker=MARKER) == sum(map(len,
                                                                                                     files.values()))
    for name in ("step-00000020", "step-1", "step-10"):
        store.upload_dir(tmp_path / "src", f"checkpoints/{name}", marker=MARKER)
    assert store.list_subdirs("checkpoints") == ["step-00000010", "step-00000020", "step-1", "step-10"]
    assert store.list_subdirs() == ["checkpoints"]
    assert store.list_subdirs("nothing-here") == []
    assert store.list_files("checkpoints/step-00000010") == sorted(files)
    assert store.exists(f"checkpoints/step-00000010/{MARKER}")
    assert not store.exists("checkpoints/step-00000010")  # a folder is not an object
    assert not store.exists("checkpoints/step-00000030/COMPLETE")

    store.write_text("latest.txt", "step-00000020\n")
    assert store.read_text("latest.txt") == "step-00000020\n"
    with pytest.raises(FileNotFoundError):
        store.read_text("missing.txt")

    assert store.download_dir("checkpoints/step-00000010", tmp_path / "back") > 0
    assert read_tree(tmp_path / "back") == files
    store.upload_file(tmp_path / "src" / "config.json", "model/config.json")
    store.download_file("model/config.json", tmp_path / "one" / "config.json")
    assert (tmp_path / "one" / "config.json").read_bytes() == files["config.json"]
    with pytest.raises(FileNotFoundError):
        store.download_file("model/nope.json", tmp_path / "one" / "nope.json")
    with pytest.raises(FileNotFoundError):
        store.download_dir("checkpoints/step-99", tmp_path / "none")

    # "step-1" must not take "step-10" with it.
    assert store.delete_prefix("checkpoints/step-1", marker=MARKER) == len(files)
    assert store.list_subdirs("checkpoints") == ["step-00000010", "step-00000020", "step-10"]
    assert store.list_files("checkpoints/step-10") == sorted(files)
    assert store.delete_prefix("checkpoints/step-1") == 0

    # A node's share of a multi-node checkpoint: everything but the marker (the main process writes it later).
    store.upload_dir(tmp_path / "src", "checkpoints/step-00000030", exclude=(MARKER, "sub/deeper/rng_state.pt"))
    assert store.list_files("checkpoints/step-00000030") == sorted(set(files) - {MARKER, "sub/deeper/rng_state.pt"})
    with pytest.raises(StorageError, match="whole store"):
        store.delete_prefix("")


def test_multipart_upload_and_marker_last(s3_bucket, moto_server, fault_proxy, tmp_path):
    files = make_tree(tmp_path / "src", big=11 * MiB)
    store = S3Store(f"s3://{s3_bucket}/run", endpoint_url=fault_proxy.endpoint, workers=4,
                    multipart_threshold=5 * MiB, multipart_chunksize=5 * MiB)
    store.upload_dir(tmp_path / "src", "ckpt/step-5", marker=MARKER)

    etag = moto_server.client().head_object(Bucket=s3_bucket, Key="run/ckpt/step-5/model.safetensors")["ETag"]
    assert etag.strip('"').endswith("-3"), etag  # 11 MiB in 5 MiB parts: a real multipart upload
    records = fault_proxy.forwarded()
    # An object becomes visible on its PUT, or for multipart on CompleteMultipartUpload (POST ?uploadId=...).
    writes = [i for i, r in enumerate(records) if (r.method == "PUT" and "uploadId" not in r.query)
              or (r.method == "POST" and "uploadId=" in r.query)]
    assert len(writes) == len(files)
    assert records[writes[-1]].path.endswith(f"/ckpt/step-5/{MARKER}")
    assert all(not records[i].path.endswith(MARKER) for i in writes[:-1])
    parts = [i for i, r in enumerate(records) if "partNumber=" in r.query]
    assert len(parts) == 3 and max(parts) < writes[-1]
    old_marker_delete = [i for i, r in enumerate(records) if r.method == "DELETE" and r.path.endswith(MARKER)]
    assert old_marker_delete and old_marker_delete[0] < writes[0]

    assert store.download_dir("ckpt/step-5", tmp_path / "back") == sum(map(len, files.values()))
    assert read_tree(tmp_path / "back") == files


def test_failed_upload_leaves_no_marker(s3_bucket, moto_server, fault_proxy, tmp_path):
    make_tree(tmp_path / "src")
    direct = S3Store(f"s3://{s3_bucket}/run", endpoint_url=moto_server.endpoint)
    store = S3Store(f"s3://{s3_bucket}/run", endpoint_url=fault_proxy.endpoint, max_attempts=2)
    store.upload_dir(tmp_path / "src", "ckpt/step-7", marker=MARKER)
    assert direct.exists(f"ckpt/step-7/{MARKER}")

    # Re-upload over it: the old marker goes, one file gets through, then every connection is reset.
    fault_proxy.fail_after(2, "reset")
    seen = len(fault_proxy.records)
    started = time.monotonic()
    with pytest.raises(StorageError) as err:
        store.upload_dir(tmp_path / "src", "ckpt/step-7", marker=MARKER)
    assert time.monotonic() - started < 15
    assert_clean_message(err.value, f"s3://{s3_bucket}/run/ckpt/step-7", "marker not written")
    assert not direct.exists(f"ckpt/step-7/{MARKER}")
    attempts = fault_proxy.records[seen:]
    assert attempts[0].method == "DELETE" and attempts[0].path.endswith(MARKER) and attempts[0].outcome == "204"
    assert not [r for r in attempts if r.method == "PUT" and r.path.endswith(MARKER)]  # never even tried

    fault_proxy.heal()
    store.upload_dir(tmp_path / "src", "ckpt/step-7", marker=MARKER)
    assert direct.exists(f"ckpt/step-7/{MARKER}")


def test_uploads_survive_injected_faults(s3_bucket, moto_server, fault_proxy, tmp_path):
    """20% of requests get a 500, a 503 or a reset connection: retries make every upload and download whole."""
    fault_proxy.configure(fault_rate=0.2, seed=1234, faults=("500", "503", "reset"))
    store = S3Store(f"s3://{s3_bucket}/run", endpoint_url=fault_proxy.endpoint, workers=4,
                    multipart_threshold=5 * MiB, multipart_chunksize=5 * MiB)
    trees = {}
    for i in range(3):
        src = tmp_path / f"src{i}"
        trees[i] = make_tree(src, seed=i, big=6 * MiB if i == 0 else 0)
        for j in range(6):
            (src / f"shards/rank{j}.bin").parent.mkdir(exist_ok=True)
            trees[i][f"shards/rank{j}.bin"] = random.Random(100 * i + j).randbytes(20_000)
            (src / f"shards/rank{j}.bin").write_bytes(trees[i][f"shards/rank{j}.bin"])
        store.upload_dir(src, f"ckpt/step-{i}", marker=MARKER)

    direct = S3Store(f"s3://{s3_bucket}/run", endpoint_url=moto_server.endpoint)
    assert direct.list_subdirs("ckpt") == ["step-0", "step-1", "step-2"]
    for i, files in trees.items():
        assert direct.exists(f"ckpt/step-{i}/{MARKER}")
        direct.download_dir(f"ckpt/step-{i}", tmp_path / f"direct{i}")
        assert read_tree(tmp_path / f"direct{i}") == files
        store.download_dir(f"ckpt/step-{i}", tmp_path / f"faulty{i}")  # downloads through the faults too
        assert read_tree(tmp_path / f"faulty{i}") == files
    assert not moto_server.client().list_multipart_uploads(Bucket=s3_bucket).get("Uploads")
    kinds = {r.outcome for r in fault_proxy.injected()}
    assert {"fault:500", "fault:503", "reset"} <= kinds, kinds


# ---------------------------------------------------------------------------------------------------------- check()


def test_check_missing_bucket(s3_env, moto_server):
    started = time.monotonic()
    with pytest.raises(StorageError) as err:
        S3Store("s3://lfqa-no-such-bucket/run", endpoint_url=moto_server.endpoint).check()
    assert time.monotonic() - started < 5
    assert_clean_message(err.value, "s3://lfqa-no-such-bucket/run", "does not exist",
                         secrets=(s3_env["AWS_SECRET_ACCESS_KEY"], s3_env["AWS_ACCESS_KEY_ID"]))


def test_check_no_credentials(s3_env, s3_bucket, moto_server, monkeypatch):
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")  # profile files point to /dev/null and IMDS is off (s3_env)
    started = time.monotonic()
    with pytest.raises(StorageError) as err:
        S3Store(f"s3://{s3_bucket}/run", endpoint_url=moto_server.endpoint).check()
    assert time.monotonic() - started < 5
    assert_clean_message(err.value, s3_bucket, "no usable AWS credentials")


def test_check_unreachable_endpoint(s3_env):
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    started = time.monotonic()
    with pytest.raises(StorageError) as err:
        S3Store("s3://some-bucket/run", endpoint_url=endpoint).check()
    assert time.monotonic() - started < 5
    assert_clean_message(err.value, "s3://some-bucket/run", f"cannot connect to endpoint {endpoint}",
                         secrets=(s3_env["AWS_SECRET_ACCESS_KEY"],))


def test_check_bad_and_read_only_credentials(s3_env, s3_bucket, moto_server, monkeypatch):
    """moto accepts any key unless IAM authentication is switched on; with it on, it checks signatures and
    policies like S3 does. Keys come from moto's IAM (created while authentication is still off)."""
    key_id, secret = moto_server.make_access_key(["s3:*"])
    ro_key_id, ro_secret = moto_server.make_access_key(["s3:GetObject", "s3:ListBucket"])
    cases = [
        ("AKIAFAKEFAKEFAKE1234", "not-a-real/secret+value1234", "InvalidAccessKeyId"),
        (key_id, "wrong/secret+value-for-a-real-key", "SignatureDoesNotMatch"),
        (ro_key_id, ro_secret, "cannot write and delete"),
    ]
    with moto_server.iam_auth():
        for access_key, secret_key, expected in cases:
            monkeypatch.setenv("AWS_ACCESS_KEY_ID", access_key)
            monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret_key)
            started = time.monotonic()
            with pytest.raises(StorageError) as err:
                S3Store(f"s3://{s3_bucket}/run", endpoint_url=moto_server.endpoint).check()
            assert time.monotonic() - started < 5
            assert_clean_message(err.value, f"s3://{s3_bucket}/run", expected, secrets=(access_key, secret_key))
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", key_id)
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
        S3Store(f"s3://{s3_bucket}/run", endpoint_url=moto_server.endpoint).check()  # a good key passes


# ---------------------------------------------------------------------------------------------------------- uploader


class SlowStore(LocalStore):
    """A LocalStore whose uploads take ``delay`` seconds and fail for the names in ``fail``."""

    def __init__(self, root: Path, delay: float, fail: tuple[str, ...] = ()):
        super().__init__(root)
        self.delay, self.fail, self.spans = delay, fail, []

    def upload_dir(self, local_dir, remote_subpath, marker=None, exclude=()):
        started = time.monotonic()
        time.sleep(self.delay)
        if remote_subpath in self.fail:
            raise StorageError(f"upload to {self.url(remote_subpath)} failed: injected")
        total = super().upload_dir(local_dir, remote_subpath, marker, exclude=exclude)
        self.spans.append((remote_subpath, started, time.monotonic()))
        return total


def test_background_uploader_keeps_order_and_reports_failures(tmp_path):
    make_tree(tmp_path / "src")
    store = SlowStore(tmp_path / "store", delay=0.4, fail=("ckpt/bad",))
    done = []
    uploader = BackgroundUploader(store, on_done=lambda sub, ok: done.append((sub, ok)))
    assert uploader.submit(tmp_path / "src", "ckpt/a", MARKER) < 0.1  # the training step does not wait
    assert uploader.busy
    waited = uploader.submit(tmp_path / "src", "ckpt/b", MARKER)  # waits for "a" to finish first
    assert waited > 0.2
    assert uploader.wait(timeout=0.01) is False  # "b" is still running
    assert uploader.wait(timeout=10) is True and not uploader.busy
    (a, _, a_end), (b, b_start, _) = store.spans
    assert (a, b) == ("ckpt/a", "ckpt/b") and b_start >= a_end
    assert done == [("ckpt/a", True), ("ckpt/b", True)]
    assert store.exists(f"ckpt/b/{MARKER}")

    uploader.submit(tmp_path / "src", "ckpt/bad", MARKER)
    uploader.submit(tmp_path / "src", "ckpt/c", MARKER)  # a failure does not stop the next upload
    uploader.submit(tmp_path / "src", "ckpt/d", exclude=(MARKER,))
    assert uploader.close(timeout=10)
    assert done[2:] == [("ckpt/bad", False), ("ckpt/c", True), ("ckpt/d", True)]
    assert len(uploader.errors) == 1 and "ckpt/bad" in uploader.errors[0]
    assert not store.exists(f"ckpt/bad/{MARKER}") and store.exists(f"ckpt/c/{MARKER}")
    assert store.exists("ckpt/d/config.json") and not store.exists(f"ckpt/d/{MARKER}")
    with pytest.raises(RuntimeError, match="closed"):
        uploader.submit(tmp_path / "src", "ckpt/e", MARKER)


def test_background_uploader_on_s3(s3_bucket, moto_server, fault_proxy, tmp_path):
    make_tree(tmp_path / "src")
    store = S3Store(f"s3://{s3_bucket}/run", endpoint_url=fault_proxy.endpoint, max_attempts=2)
    results = []

    def retention(sub, ok):
        results.append((sub, ok))
        if sub == "ckpt/2":
            raise RuntimeError("retention broke")

    uploader = BackgroundUploader(store, on_done=retention)
    uploader.submit(tmp_path / "src", "ckpt/1", MARKER)
    assert uploader.wait(timeout=30)
    fault_proxy.fail_after(0, "500")
    uploader.submit(tmp_path / "src", "ckpt/2", MARKER)
    assert uploader.wait(timeout=30)
    assert results == [("ckpt/1", True), ("ckpt/2", False)]
    assert len(uploader.errors) == 2
    assert f"s3://{s3_bucket}/run/ckpt/2" in uploader.errors[0] and "retention broke" in uploader.errors[1]
    fault_proxy.heal()
    assert store.exists(f"ckpt/1/{MARKER}") and not store.exists(f"ckpt/2/{MARKER}")
    assert uploader.close(timeout=10) is False  # the last upload failed and nothing retries it


# ---------------------------------------------------------------------------------------------------------- staging


def test_stage_s3_folder_and_file(s3_bucket, moto_server, fault_proxy, tmp_path, monkeypatch):
    files = make_tree(tmp_path / "model")
    remote = S3Store(f"s3://{s3_bucket}", endpoint_url=moto_server.endpoint)
    remote.upload_dir(tmp_path / "model", "models/tiny")
    remote.write_text("data/train.jsonl", '{"question": "q"}\n')
    cache = tmp_path / "cache"

    def stage(uri):
        return stage_s3_uri(uri, cache, endpoint_url=fault_proxy.endpoint)

    folder = stage(f"s3://{s3_bucket}/models/tiny")
    assert folder.is_dir() and folder.name == "tiny" and read_tree(folder) == files
    data = stage(f"s3://{s3_bucket}/data/train.jsonl")
    assert data.name == "train.jsonl" and data.read_text() == '{"question": "q"}\n'
    assert stage(f"s3://{s3_bucket}/models/tiny/").is_dir()  # a trailing "/" says folder

    # Reused: the second call only lists and HEADs, it downloads nothing.
    seen = len(fault_proxy.records)
    assert stage(f"s3://{s3_bucket}/models/tiny") == folder
    assert stage(f"s3://{s3_bucket}/data/train.jsonl") == data
    assert not [r for r in fault_proxy.records[seen:] if r.method == "GET" and r.path.startswith(f"/{s3_bucket}/")]

    remote.write_text("data/train.jsonl", '{"question": "changed"}\n')  # a changed object is staged again
    assert stage(f"s3://{s3_bucket}/data/train.jsonl").read_text() == '{"question": "changed"}\n'
    assert not [p for p in cache.iterdir() if p.name.startswith(".")]  # no temporary folders left

    def unreachable(*args):
        raise StorageError("cannot connect to endpoint")

    with monkeypatch.context() as patch:
        patch.setattr(lfqa.storage, "_remote_listing", unreachable)
        assert stage(f"s3://{s3_bucket}/models/tiny") == folder  # offline: the complete copy is used
    with pytest.raises(StorageError, match="nothing to stage"):
        stage_s3_uri(f"s3://{s3_bucket}/models/none", cache, endpoint_url=moto_server.endpoint)


def test_fault_proxy_is_reusable_standalone(object_store, tmp_path):
    """Other test files build their own proxy: healthy by default, stops cleanly; requests it forwards keep
    their signature (SeaweedFS checks it)."""
    bucket = object_store.make_bucket()
    with FaultProxy(object_store.endpoint, fault_rate=1.0, seed=3, faults=("503",)) as proxy:
        store = S3Store(f"s3://{bucket}/run", endpoint_url=proxy.endpoint, max_attempts=2)
        with pytest.raises(StorageError, match="ServiceUnavailable"):
            store.write_text("x.txt", "x")
        proxy.heal()
        store.write_text("x.txt", "x")
        assert store.read_text("x.txt") == "x"


def test_isolated_upload_runs_in_a_low_priority_child_and_reports_its_errors(moto_server, s3_env, tmp_path):
    from lfqa.storage import BackgroundUploader, S3Store

    folder = tmp_path / "ckpt"
    (folder / "sub").mkdir(parents=True)
    (folder / "sub" / "weights.bin").write_bytes(bytes(range(256)) * 256)
    (folder / "COMPLETE").write_text("{}")
    bucket = moto_server.make_bucket()
    uploader = BackgroundUploader(S3Store(f"s3://{bucket}/run", endpoint_url=moto_server.endpoint), isolate=True)
    uploader.submit(folder, "checkpoints/step-00000001", marker="COMPLETE")
    assert uploader.wait(60) and not uploader.errors
    s3 = moto_server.client()
    body = s3.get_object(Bucket=bucket, Key="run/checkpoints/step-00000001/sub/weights.bin")["Body"].read()
    assert body == (folder / "sub" / "weights.bin").read_bytes()
    assert s3.head_object(Bucket=bucket, Key="run/checkpoints/step-00000001/COMPLETE")
    uploader.close(10)

    failing = BackgroundUploader(S3Store("s3://no-such-bucket-for-lfqa/run", endpoint_url=moto_server.endpoint),
                                 isolate=True)
    failing.submit(folder, "checkpoints/step-00000002", marker="COMPLETE")
    assert failing.wait(60)
    assert len(failing.errors) == 1 and "no-such-bucket-for-lfqa" in failing.errors[0]
    assert "\n" not in failing.errors[0] and s3_env["AWS_SECRET_ACCESS_KEY"] not in failing.errors[0]
    failing.close(10)


# ---------------------------------------------------------------------------------------------------------- real stores


def test_an_emptied_prefix_counts_as_absent(object_store, tmp_path):
    """SeaweedFS keeps listing a prefix whose objects were all deleted (for ~2 minutes); the store does not."""
    make_tree(tmp_path / "src")
    bucket = object_store.make_bucket()
    store = S3Store(f"s3://{bucket}/run", endpoint_url=object_store.endpoint)
    for name in ("step-00000001", "step-00000002"):
        store.upload_dir(tmp_path / "src", f"checkpoints/{name}", marker=MARKER)
    store.delete_prefix("checkpoints/step-00000001", marker=MARKER)
    raw = object_store.client().list_objects_v2(Bucket=bucket, Prefix="run/checkpoints/", Delimiter="/")
    listed = {p["Prefix"] for p in raw.get("CommonPrefixes", [])}
    if type(object_store).__name__ == "SeaweedS3":
        assert "run/checkpoints/step-00000001/" in listed  # the server's own listing still has it
    assert store.list_subdirs("checkpoints") == ["step-00000002"]
    assert store.list_files("checkpoints/step-00000001") == []


def test_seaweedfs_checks_credentials(seaweedfs_server, s3_env, monkeypatch):
    bucket = seaweedfs_server.make_bucket()
    S3Store(f"s3://{bucket}/run", endpoint_url=seaweedfs_server.endpoint).check()
    for access_key, secret_key, expected in [("AKIAFAKEFAKEFAKE1234", "not-a-real/secret+value1234",
                                              "InvalidAccessKeyId"),
                                             (s3_env["AWS_ACCESS_KEY_ID"], "wrong/secret+value-1234",
                                              "SignatureDoesNotMatch")]:
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", access_key)
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret_key)
        with pytest.raises(StorageError) as err:
            S3Store(f"s3://{bucket}/run", endpoint_url=seaweedfs_server.endpoint).check()
        assert_clean_message(err.value, f"s3://{bucket}/run", expected, secrets=(access_key, secret_key))


# ------------------------------------------------------------------------------------------------------ stuck stores


def test_a_server_that_never_answers_fails_a_request_in_bounded_time(s3_env):
    from s3_server import BlackHole

    with BlackHole() as hole:
        store = S3Store("s3://some-bucket/run", endpoint_url=hole.endpoint, max_attempts=2, timeout=1.0)
        started = time.monotonic()
        with pytest.raises(StorageError) as err:
            store.write_text("x.txt", "x")
        seconds = time.monotonic() - started
    assert 3.5 < seconds < 9, seconds  # two tries, each a second for "100 Continue" and one for the answer
    assert_clean_message(err.value, "s3://some-bucket/run/x.txt", "did not answer in time",
                         secrets=(s3_env["AWS_SECRET_ACCESS_KEY"],))
    # The defaults bound a write (two waits per try) to a minute; the limits travel to copies of the store.
    default = S3Store("s3://some-bucket/run", endpoint_url=hole.endpoint)
    assert 2 * default.max_attempts * default.timeout <= 60
    tuned = default.with_limits(3, 2.5)
    assert (tuned.max_attempts, tuned.timeout, tuned.uri, tuned.endpoint) == (3, 2.5, default.uri, default.endpoint)
    assert tuned._client.meta.config.read_timeout == 2.5


class GatedStore(LocalStore):
    """A LocalStore whose uploads wait for their gate (an Event per name) and fail while ``failing`` is set."""

    def __init__(self, root: Path):
        super().__init__(root)
        self.gates: dict[str, threading.Event] = {}
        self.failing = threading.Event()
        self.tries: list[str] = []

    def upload_dir(self, local_dir, remote_subpath, marker=None, exclude=()):
        self.tries.append(remote_subpath)
        self.gates.get(remote_subpath, _OPEN).wait(30)
        if self.failing.is_set():
            raise StorageError(f"upload to {self.url(remote_subpath)} failed: the store is down")
        return super().upload_dir(local_dir, remote_subpath, marker, exclude=exclude)


_OPEN = threading.Event()
_OPEN.set()


def test_a_stuck_upload_holds_submit_for_at_most_wait_seconds_and_the_newest_goes_next(tmp_path):
    make_tree(tmp_path / "src")
    store = GatedStore(tmp_path / "store")
    store.gates["ckpt/1"] = threading.Event()  # the first upload hangs
    messages, done = [], []
    uploader = BackgroundUploader(store, on_done=lambda sub, ok: done.append((sub, ok)), wait_seconds=0.3,
                                  report=messages.append)
    assert uploader.submit(tmp_path / "src", "ckpt/1", MARKER) < 0.1
    for name in ("ckpt/2", "ckpt/3"):
        started = time.monotonic()
        waited = uploader.submit(tmp_path / "src", name, MARKER)
        assert 0.25 < waited < 0.6 and time.monotonic() - started < 0.7, waited
    assert uploader.queued == "ckpt/3" and uploader.dropped == ["ckpt/2"]
    assert any("ckpt/2 will not be uploaded: ckpt/3 is newer" in m for m in messages), messages
    store.gates["ckpt/1"].set()
    assert uploader.close(timeout=10)
    assert done == [("ckpt/1", True), ("ckpt/3", True)]
    assert store.list_subdirs("ckpt") == ["1", "3"]


def test_a_failed_upload_is_tried_again_until_the_store_answers(tmp_path):
    make_tree(tmp_path / "src")
    store = GatedStore(tmp_path / "store")
    store.failing.set()
    done = []
    uploader = BackgroundUploader(store, on_done=lambda sub, ok: done.append((sub, ok)), retry_seconds=0.1,
                                  report=lambda message: None)
    uploader.submit(tmp_path / "src", "ckpt/1", MARKER)
    deadline = time.monotonic() + 10
    while len(store.tries) < 3:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert uploader.wait(timeout=5)  # a folder waiting for its next try does not hold wait()
    store.failing.clear()  # the store is back
    while not store.exists(f"ckpt/1/{MARKER}"):
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert uploader.close(timeout=5)
    assert done[-1] == ("ckpt/1", True) and {d for d in done[:-1]} == {("ckpt/1", False)}
    assert len(uploader.errors) == len(done) - 1 >= 2


def test_close_stops_a_hung_upload_in_a_child_within_its_timeout(s3_bucket, fault_proxy, tmp_path):
    make_tree(tmp_path / "src")
    store = S3Store(f"s3://{s3_bucket}/run", endpoint_url=fault_proxy.endpoint, timeout=60)
    fault_proxy.fail_after(0, "hang")
    uploader = BackgroundUploader(store, isolate=True, retry_seconds=0.1, report=lambda message: None)
    uploader.submit(tmp_path / "src", "ckpt/1", MARKER)
    deadline = time.monotonic() + 30
    while not fault_proxy.injected():  # the child is up and its first request hangs
        assert time.monotonic() < deadline
        time.sleep(0.05)
    started = time.monotonic()
    assert uploader.close(timeout=1.0, retries=5) is False
    assert time.monotonic() - started < 4
    assert uploader.errors and "was stopped (signal 9)" in uploader.errors[-1]
    fault_proxy.heal()
    assert not store.exists(f"ckpt/1/{MARKER}")
