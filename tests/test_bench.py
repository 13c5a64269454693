"""benchmarks/run.py at toy scale: all three variants run and the table's numbers make sense (no timing)."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import numpy as np
import yaml
from conftest import ROOT, lfqa_env


def table_rows(text: str) -> dict[str, list[str]]:
    rows = {}
    for line in text.splitlines():
        match = re.match(r"\| ([abcd]): ", line)
        if match:
            rows[match.group(1)] = [cell.strip() for cell in line.strip().strip("|").split("|")]
    return rows


def test_bench_runs_the_variants_and_reports_sane_numbers(tmp_path):
    out, work = tmp_path / "bench.md", tmp_path / "work"
    cmd = [sys.executable, "benchmarks/run.py", "--preset", "tiny", "--samples", "6", "--seed-samples", "2",
           "--out", str(out), "--work-dir", str(work), "--variants", "abcd"]
    proc = subprocess.run(cmd, cwd=ROOT, env=lfqa_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = out.read_text()
    assert text in proc.stdout  # the table is printed and written

    rows = table_rows(text)
    assert sorted(rows) == ["a", "b", "c", "d"]
    header = [c.strip() for c in next(line for line in text.splitlines() if line.startswith("| variant")).strip(
        "|").split("|")]
    col = {name: header.index(name) for name in header}
    value = {v: {name: r[i] for name, i in col.items()} for v, r in rows.items()}
    assert [int(value[v]["rows"]) for v in "abc"] == [2, 6, 6]
    for v in "abc":
        assert float(value[v]["samples/s"]) > 0 and float(value[v]["real tokens/s"]) > 0
        assert int(value[v]["optimizer steps"]) >= 1
        for side in ("encoder padding eff.", "decoder padding eff."):
            assert 0 < float(value[v][side]) <= 1
        assert re.match(r"\d+\.\d\d GiB \(\+\d+\.\d\d GiB\)", value[v]["peak RSS (+ over start)"])
    assert [int(value[v]["optimizer steps"]) for v in "ab"] == [1, 3]  # batches of 2

    # Exact padding figures from the rows' own lengths: a pads every input to 8,192 and every answer to 512;
    # c's batches never mix window buckets, so only the window's own padding is left.
    lengths = json.loads((work / "lengths.json").read_text())
    inputs, answers = np.array(lengths["input"]), np.array(lengths["answer"])
    assert float(value["a"]["encoder padding eff."]) == round(inputs[:2].sum() / (2 * 8192), 3)
    assert float(value["a"]["decoder padding eff."]) == round(answers[:2].sum() / (2 * 512), 3)
    window = 16
    bound = inputs.sum() / (-(-inputs // window) * window).sum()
    assert float(value["c"]["encoder padding eff."]) == round(bound, 3)
    assert f"caps encoder efficiency at {bound:.3f}" in text
    assert float(value["c"]["decoder padding eff."]) >= float(value["b"]["decoder padding eff."])
    # d is c's ablation: the same loop and batches, without lfqa's attention, fused AdamW and malloc setting
    for column in ("rows", "optimizer steps", "encoder padding eff.", "decoder padding eff."):
        assert value["d"][column] == value["c"][column]
    job_d = yaml.safe_load((work / "job-d.yaml").read_text())
    assert job_d["model"]["encoder_attention"] == "eager" and job_d["train"]["fused_optimizer"] is False
    assert "encoder_attention" not in yaml.safe_load((work / "job-c.yaml").read_text())["model"]  # the default
    assert re.search(r"\*\*c/d: \d+\.\d\dx\*\*", text)

    for ratio in ("c/a", "c/b"):
        assert re.search(rf"\*\*{ratio}: \d+\.\d\dx\*\* samples/s", text)
    # c went through lfqa's real entry point: its run folder holds lfqa's own records.
    assert (work / "run-c" / "metrics.jsonl").exists() and (work / "run-c" / "summary.json").exists()


def test_bench_help_names_the_options():
    proc = subprocess.run([sys.executable, "benchmarks/run.py", "--help"], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0
    for option in ("--samples", "--seed-samples", "--preset", "--device", "--precision", "--out", "--max-tokens"):
        assert option in proc.stdout
    assert "led-base" in proc.stdout and "make bench" in proc.stdout
