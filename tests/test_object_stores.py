"""A run's bucket on moto and on a real S3-compatible store (SeaweedFS): write, retention, list, pull, prune,
export, and a new pod with an empty disk resuming from the bucket.

SeaweedFS keeps listing an emptied prefix for about two minutes: right after retention deleted a checkpoint, it
must neither show up as "incomplete" nor be deleted again at the next checkpoint.

    pytest tests/test_object_stores.py
"""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import ROOT
from test_checkpoints import bucket_files, checkpoint_names, run_to_end, s3_env_for, single_cmd

PYTHON = sys.executable


def lfqa_cli(env: dict, *args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([PYTHON, "-m", "lfqa.cli", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


def bucket_deletions(output: str, uri: str) -> list[str]:
    """The checkpoint names each retention line says it deleted from the bucket, in order."""
    return [name for line in output.splitlines() if line.startswith("checkpoints: deleted") and f"from {uri}" in line
            for name in line.split("deleted ", 1)[1].split(" from ")[0].split(", ")]


def test_a_run_in_the_bucket_is_retained_listed_pulled_pruned_exported_and_resumed(object_store, tmp_path):
    bucket = object_store.make_bucket()
    uri = f"s3://{bucket}/run"
    env = s3_env_for(object_store, tmp_path)
    keep = ["checkpoint.every_steps=2", "checkpoint.keep_last=1", "checkpoint.keep_best=0", "eval.every_steps=0"]
    first = run_to_end(single_cmd(tmp_path / "pod1", tmp_path, uri, object_store.endpoint, "train.max_steps=6",
                                  *keep), env=env)
    # Each checkpoint is deleted from the bucket once, although SeaweedFS still lists the emptied prefixes.
    assert bucket_deletions(first.stdout + first.stderr, uri) == ["step-00000002", "step-00000004"]
    files = bucket_files(object_store, bucket, "run/")
    assert checkpoint_names(files) == {"step-00000006"} and "model/model.safetensors" in files

    # A new pod with an empty disk: it resumes from the bucket, and retention there drops step 6.
    second = run_to_end(single_cmd(tmp_path / "pod2", tmp_path, uri, object_store.endpoint, "train.max_steps=8",
                                   *keep), env=env)
    out = second.stdout + second.stderr
    assert f"resuming from {uri}/checkpoints/step-00000006" in out and "resumed at step 6" in out, out[-3000:]
    assert json.loads((tmp_path / "pod2" / "summary.json").read_text())["resumed_from"]["step"] == 6
    assert bucket_deletions(out, uri) == ["step-00000006"]

    endpoint = ["--s3-endpoint-url", object_store.endpoint]
    listing = lfqa_cli(env, "checkpoints", "list", uri, *endpoint).stdout
    rows = [line for line in listing.splitlines() if line.startswith("step-")]
    assert len(rows) == 1 and rows[0].split()[:3] == ["step-00000008", "8", "complete"] and "<- resume" in rows[0]
    assert "1 checkpoint(s)" in listing and "0 incomplete" in listing, listing
    plan = lfqa_cli(env, "checkpoints", "prune", uri, "--keep-last", "1", "--keep-best", "0", "--dry-run",
                    *endpoint).stdout
    assert plan.split("\n")[:-1] == ["keep   step-00000008"], plan

    pulled = tmp_path / "pulled"
    lfqa_cli(env, "checkpoints", "pull", uri, "--out", str(pulled), *endpoint)
    assert (pulled / "COMPLETE").exists() and json.loads((pulled / "trainer_state.json").read_text())["step"] == 8

    exported = tmp_path / "exported"
    lfqa_cli(env, "export", f"{uri}/checkpoints/step-00000008", "--out", str(exported), *endpoint)
    from safetensors.torch import load_file

    weights, final = (load_file(str(p / "model.safetensors")) for p in (exported, tmp_path / "pod2" / "model"))
    assert weights.keys() == final.keys() and all((weights[k] == final[k]).all() for k in final)
