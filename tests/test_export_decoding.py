"""The trained and the exported model decode as trained with plain transformers (no lfqa import), as in the README."""

import json
import shutil
import subprocess
import sys

import pytest

from lfqa.answer import main as answer_main
from lfqa.export import main as export_main
from lfqa.modeling import BUNDLED_VALIDATION

VAL = [json.loads(line) for line in BUNDLED_VALIDATION.read_text().splitlines()]

# The README's snippet ("Using the trained model without lfqa"), run in a fresh interpreter.
PLAIN_TRANSFORMERS = r'''
import sys

import torch
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

model_dir, question, passages = sys.argv[1], sys.argv[2], sys.argv[3:]

tokenizer = AutoTokenizer.from_pretrained(model_dir)
model = AutoModelForSeq2SeqLM.from_pretrained(model_dir)
# The input as lfqa builds it: "question: ... context: ..." (passages joined with spaces), cut to the model's length.
inputs = tokenizer(f"question: {question} context: {' '.join(passages)}", return_tensors="pt",
                   truncation=True, max_length=model.config.max_encoder_position_embeddings)
# Global attention on <s> and the question's tokens (data.global_attention: question).
global_attention_mask = torch.zeros_like(inputs["input_ids"])
global_attention_mask[:, : len(tokenizer(f"question: {question}")["input_ids"]) - 1] = 1
# No decoding arguments: generation_config.json holds the job's (beams, lengths, no-repeat n-grams).
output = model.generate(**inputs, global_attention_mask=global_attention_mask)
print(tokenizer.decode(output[0], skip_special_tokens=True).strip())

assert not any(name == "lfqa" or name.startswith("lfqa.") for name in sys.modules), "lfqa was imported"
'''


def plain_answer(model_dir, row, tmp_path) -> str:
    script = tmp_path / "plain.py"
    script.write_text(PLAIN_TRANSFORMERS)
    # Run from tmp_path, so that the repository's lfqa folder is not even importable by accident.
    proc = subprocess.run([sys.executable, str(script), str(model_dir), row["question"], *row["context"]],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Token indices sequence length" not in proc.stderr
    return proc.stdout.strip()


def lfqa_answer(model_dir, row, capsys) -> str:
    assert answer_main(["--model", str(model_dir), "--question", row["question"], "--context", *row["context"]]) == 0
    return capsys.readouterr().out.strip()


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory):
    _, run_dir, _ = trained
    last = sorted((run_dir / "checkpoints").glob("step-*"))[-1]
    out = tmp_path_factory.mktemp("exported") / "model"
    assert export_main([str(last), "--out", str(out)]) == 0
    return out


def test_exported_model_carries_the_jobs_decoding_settings(exported, trained):
    _, run_dir, _ = trained
    for folder in (exported, run_dir / "model"):
        gen = json.loads((folder / "generation_config.json").read_text())
        # jobs/tiny-cpu.yaml's eval.generation, and LED's decoder start token (</s>) as in training.
        assert (gen["num_beams"], gen["max_new_tokens"], gen["no_repeat_ngram_size"]) == (1, 96, 3)
        assert gen["decoder_start_token_id"] == json.loads((folder / "config.json").read_text())["eos_token_id"]


def test_plain_transformers_decodes_exactly_as_lfqa_answer(exported, trained, tmp_path, capsys):
    _, run_dir, _ = trained
    row = VAL[7]
    expected = lfqa_answer(run_dir / "model", row, capsys)
    assert len(expected.split()) >= 10
    assert plain_answer(run_dir / "model", row, tmp_path) == expected
    assert plain_answer(exported, row, tmp_path) == expected
    assert lfqa_answer(exported, row, capsys) == expected


def test_old_checkpoints_get_the_settings_from_their_job(trained, tmp_path):
    _, run_dir, _ = trained
    old = tmp_path / "step-old"
    shutil.copytree(sorted((run_dir / "checkpoints").glob("step-*"))[-1], old)
    (old / "hf" / "generation_config.json").unlink(missing_ok=True)
    assert export_main([str(old), "--out", str(tmp_path / "out")]) == 0
    gen = json.loads((tmp_path / "out" / "generation_config.json").read_text())
    assert (gen["num_beams"], gen["max_new_tokens"], gen["no_repeat_ngram_size"]) == (1, 96, 3)
