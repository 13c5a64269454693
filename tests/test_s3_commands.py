"""eval, answer and data-report read models and data from S3 through the same endpoint settings as training."""

import json
import shutil
from pathlib import Path

import pytest

from lfqa.cli import main as lfqa_main
from lfqa.config import dump_job, load_job
from lfqa.modeling import BUNDLED_VALIDATION

ROOT = Path(__file__).resolve().parent.parent
ROWS = BUNDLED_VALIDATION.read_text().splitlines()[:4]
FAST = ["eval.generation.num_beams=1", "eval.generation.max_new_tokens=8"]


@pytest.fixture
def bucket_with_model_and_data(moto_server, s3_bucket, tiny_model_path, tmp_path, monkeypatch):
    """s3://BUCKET/model (the tiny model with a job.yaml whose data is in the bucket) and s3://BUCKET/data/*.jsonl."""
    monkeypatch.chdir(tmp_path)  # the default cache folders (.cache/lfqa/...) land here
    job = load_job(ROOT / "jobs" / "tiny-cpu.yaml", [
        f"data.train_files=[s3://{s3_bucket}/data/train.jsonl]",
        f"data.validation_files=[s3://{s3_bucket}/data/val.jsonl]",
        f"output.s3_endpoint_url={moto_server.endpoint}", "output.s3_region=us-east-1",
        f"data.cache_dir={tmp_path / 'datasets'}", f"model.cache_dir={tmp_path / 'models'}", *FAST])
    model = tmp_path / "model"
    shutil.copytree(tiny_model_path, model)
    (model / "job.yaml").write_text(dump_job(job))
    client = moto_server.client()
    for f in model.iterdir():
        client.upload_file(str(f), s3_bucket, f"model/{f.name}")
    for name in ("train.jsonl", "val.jsonl"):
        client.put_object(Bucket=s3_bucket, Key=f"data/{name}", Body="\n".join(ROWS).encode() + b"\n")
    return s3_bucket, model


def test_eval_reads_the_model_and_the_jobs_data_from_s3(bucket_with_model_and_data, moto_server, tmp_path, capsys):
    bucket, _ = bucket_with_model_and_data
    # The model through AWS_ENDPOINT_URL (set by s3_env), the data through the endpoint in the model's job.yaml.
    out = tmp_path / "eval"
    assert lfqa_main(["eval", "--model", f"s3://{bucket}/model", "--out", str(out), "--bootstrap", "10"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["data"]["examples"] == 4 and report["data"]["source"].endswith("val.jsonl")
    assert report["job"].endswith("job.yaml")
    assert "4 examples; predictions and report written to" in capsys.readouterr().out


def test_without_aws_endpoint_url_the_jobs_endpoint_is_used(bucket_with_model_and_data, moto_server, tmp_path,
                                                             capsys, monkeypatch):
    bucket, model = bucket_with_model_and_data
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    # A local model whose job.yaml has the endpoint: the data in the bucket is found through it alone.
    out = tmp_path / "eval"
    assert lfqa_main(["eval", "--model", str(model), "--out", str(out), "--bootstrap", "10", "--limit", "2"]) == 0
    assert json.loads((out / "report.json").read_text())["data"]["examples"] == 2
    # The model in the bucket: its endpoint given as an override, as training takes it.
    code = lfqa_main(["answer", "--model", f"s3://{bucket}/model", "--question", "Why?", "--context", "Some text.",
                      f"output.s3_endpoint_url={moto_server.endpoint}", "--max-new-tokens", "4"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert captured.out.strip()
    # Data files given by URI to data-report, through the job file's endpoint.
    job_file = tmp_path / "job.yaml"
    shutil.copyfile(model / "job.yaml", job_file)
    code = lfqa_main(["data-report", "--job", str(job_file), "--data", f"s3://{bucket}/data/val.jsonl",
                      "--out", str(tmp_path / "report"), f"model.name_or_path={model}"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert json.loads((tmp_path / "report" / "report.json").read_text())["splits"]["data"]["rows_read"] == 4
    # And the job's own splits.
    code = lfqa_main(["data-report", "--job", str(job_file), "--split", "validation",
                      "--out", str(tmp_path / "report2"), f"model.name_or_path={model}"])
    assert code == 0, capsys.readouterr().err


def test_a_missing_object_is_one_line(bucket_with_model_and_data, tmp_path, capsys):
    bucket, model = bucket_with_model_and_data
    code = lfqa_main(["eval", "--model", str(model), "--data", f"s3://{bucket}/data/nothing.jsonl",
                      "--out", str(tmp_path / "eval")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and err[0].startswith(f"lfqa: error: s3://{bucket}/data/nothing.jsonl: ")
