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
    assert "bart-base" in proc.stdout and "long-t5-base" in proc.stdout


def test_longest_input_bisects_to_the_last_length_that_fits(tmp_path):
    """benchmarks/longest_input.py on CPU: a memory budget stands for the card."""
    out = tmp_path / "longest.md"
    cmd = [sys.executable, "benchmarks/longest_input.py", "--preset", "tiny", "--memory-gib", "0.04",
           "--max-positions", "2048", "--attention", "sdpa", "--checkpointing", "off", "--checkpointing", "on",
           "--threads", "1", "--out", str(out), "--json"]
    proc = subprocess.run(cmd, cwd=ROOT, env=lfqa_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = out.read_text()
    assert table in proc.stdout
    results = json.loads(proc.stdout[len(table):])
    assert [(r["attention"], r["checkpointing"]) for r in results] == [("sdpa", False), ("sdpa", True)]
    window = 16
    for r in results:
        best = r["best"]
        assert best is not None and best["fits"] and best["peak_gib"] <= 0.04
        fit = [p["input_tokens"] for p in r["probes"] if p["fits"]]
        failed = [p["input_tokens"] for p in r["probes"] if not p["fits"]]
        assert max(fit) == best["input_tokens"] and all(n > best["input_tokens"] for n in failed)
        # bisection ends next to a length that does not fit (or at the end of the position table)
        assert best["input_tokens"] + window in failed or best["input_tokens"] == 2048
        assert all(p["peak_gib"] > 0.04 for p in r["probes"] if not p["fits"])
        row = next(line for line in table.splitlines() if line.startswith(
            f"| sdpa | {'on' if r['checkpointing'] else 'off'} |"))
        assert f"{best['input_tokens']:,}" in row
    off, on = (r["best"]["input_tokens"] for r in results)
    assert on > off  # checkpointing trades compute for length
    assert "--memory-gib is required on CPU" in subprocess.run(
        [sys.executable, "benchmarks/longest_input.py", "--preset", "tiny"], cwd=ROOT, env=lfqa_env(),
        capture_output=True, text=True).stderr


def test_profile_step_reports_the_groups_of_a_step():
    cmd = [sys.executable, "benchmarks/profile_step.py", "--preset", "tiny", "--steps", "1", "--top", "5"]
    proc = subprocess.run(cmd, cwd=ROOT, env=lfqa_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    shares = dict(re.findall(r"^\| ([^|`]+?) \| (\d+\.\d)% \|$", proc.stdout, re.M))
    assert float(shares["matrix products (mm, bmm, addmm, linear)"]) > 5
    assert float(shares["fused attention kernels (SDPA)"]) > 0  # lfqa's default attention ran
    assert float(shares["optimizer step (AdamW, all its operators)"]) > 0
    assert len(re.findall(r"^\| `aten::", proc.stdout, re.M)) == 5


class _Tokenizer:
    """What family_config reads of a tokenizer: its size and special tokens."""

    pad_token_id, eos_token_id, bos_token_id = 1, 2, 0

    def __len__(self) -> int:
        return 2000


def test_base_presets_have_the_hub_models_shapes():
    """bart-base and long-t5-base are facebook/bart-base's and google/long-t5-tglobal-base's shapes, built on
    the meta device (transformers 5 ties T5's LM head to its embeddings whatever the config says: 222.9M, the
    hub's 247.6M less a 32,128 x 768 head)."""
    import torch
    from transformers import AutoModelForSeq2SeqLM

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from run import PRESETS, family_config

    counts = {}
    for name in ("bart-base", "long-t5-base", "led-base"):
        config = family_config(PRESETS[name], _Tokenizer())
        with torch.device("meta"):
            counts[name] = sum(p.numel() for p in AutoModelForSeq2SeqLM.from_config(config).parameters())
    assert round(counts["bart-base"] / 1e6, 1) == 139.4  # BART's final_logits_bias is a buffer
    assert round(counts["long-t5-base"] / 1e6, 1) == 222.9
    assert round(counts["led-base"] / 1e6, 1) == 161.8
    long_t5 = family_config(PRESETS["long-t5-base"], _Tokenizer())
    assert (long_t5.encoder_attention_type, long_t5.local_radius, long_t5.global_block_size) == (
        "transient-global", 127, 16)
    assert long_t5.decoder_start_token_id == _Tokenizer.pad_token_id  # T5 starts from <pad>


def bench(tmp_path, preset: str, variants: str) -> tuple[str, dict, dict]:
    out, work = tmp_path / "bench.md", tmp_path / "work"
    cmd = [sys.executable, "benchmarks/run.py", "--preset", preset, "--samples", "4", "--seed-samples", "2",
           "--out", str(out), "--work-dir", str(work), "--variants", variants]
    proc = subprocess.run(cmd, cwd=ROOT, env=lfqa_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = out.read_text()
    rows = table_rows(text)
    assert sorted(rows) == sorted(variants)
    lengths = json.loads((work / "lengths.json").read_text())
    return text, rows, lengths


def test_bench_runs_bart_with_its_position_limit(tmp_path):
    """BART reads at most 1,024 tokens: the rows are cut to it and the seed recipe pads to it, with no global
    attention; c's logged FLOPs equal the FLOPs model's (run.py checks it), so the table has a figure."""
    text, rows, lengths = bench(tmp_path, "tiny-bart", "ac")
    assert "- model: BART (1024 positions) 2+2 layers" in text and "inputs cut to the model's 1,024 positions" in text
    assert max(lengths["input"]) <= 1024
    assert rows["a"][0].startswith("a: seed recipe: Seq2SeqTrainer, pad to 1024/512")
    assert float(rows["a"][6]) == round(sum(lengths["input"][:2]) / (2 * 1024), 3)  # encoder padding eff.
    assert float(rows["c"][4]) > 0 and float(rows["c"][10].rstrip("%")) > 0  # samples/s, MFU


def test_bench_runs_long_t5_transient_global(tmp_path):
    text, rows, lengths = bench(tmp_path, "tiny-longt5", "c")
    assert "- model: LongT5 transient-global (local radius 8, a global token per 16 inputs) 2+2 layers" in text
    assert "inputs cut" not in text and "padding inputs to a multiple of 8 (lfqa's collator)" in text
    assert float(rows["c"][4]) > 0 and float(rows["c"][10].rstrip("%")) > 0  # samples/s, MFU
