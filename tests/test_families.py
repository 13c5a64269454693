"""BART, T5 and LongT5 through the whole job, with their tiny local models (LED has its own tests).

Each family trains on 2 CPU processes, resumes exactly after SIGKILL, evaluates, answers, exports a checkpoint
and reloads with ``from_pretrained``: BART under DDP, ZeRO-2 and ZeRO-3, T5 under DDP, LongT5 under ZeRO-2 (T5 and
LongT5 share their code path in lfqa; one launch costs ~20 s of start-up, so not every pair is run). The
shapes are the smallest that still train (d_model 32, one layer each side, inputs of at most 256 tokens, 12
steps).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, free_port, lfqa_env
from test_checkpoints import kill_tree, start_and_wait_for

from lfqa.modeling import BUNDLED_VALIDATION

FAMILIES = ["bart", "t5", "longt5"]
MODEL_TYPES = {"bart": "bart", "t5": "t5", "longt5": "longt5"}
LAUNCH_CONFIGS = {"ddp": "cpu", "zero2": "zero2-cpu", "zero3": "zero3-cpu"}
STAGE = {"bart": "zero2", "t5": "ddp", "longt5": "zero2"}
"""Each family's stage for the resume, export and answer tests."""
TINY = ["model.tiny.d_model=32", "model.tiny.ffn_dim=64", "model.tiny.encoder_layers=1",
        "model.tiny.decoder_layers=1", "model.tiny.max_input_tokens=128", "model.tiny.max_answer_tokens=64"]
# 48 rows in batches of 4 on 2 ranks: 6 steps an epoch, so 12 steps cross an epoch boundary. BART's tiny model
# has 128 positions: its inputs are cut to 128, T5's and LongT5's (no position table) to the job's 256.
JOB = ["data.max_input_tokens=256", "data.max_answer_tokens=64", "data.max_train_samples=48",
       "data.max_eval_samples=4", "eval.max_generate_samples=4", "eval.batch_size=2", "eval.at_start=false",
       "eval.generation.max_new_tokens=8", "eval.generation.num_beams=2", "train.max_steps=12",
       "train.warmup_steps=2", "checkpoint.every_steps=4", "checkpoint.keep_last=2", "checkpoint.keep_best=0",
       "tracking.progress_bar=false", "tracking.log_every_steps=1"]
STEPS = 12
TIED = ("embed_tokens.weight", "lm_head.weight")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """``runs.cmd(family, stage, run_dir)`` and ``runs.done(family, stage)``: each family and stage trained once,
    all sharing one model and data cache (each tiny model is built once)."""
    tmp = tmp_path_factory.mktemp("families")
    # Small data files, both cut from the bundled validation rows (the training file is generated on demand):
    # tokenising thousands of rows for every family would cost more than training.
    lines = BUNDLED_VALIDATION.read_text().splitlines(keepends=True)
    (tmp / "validation.jsonl").write_text("".join(lines[:8]))
    (tmp / "train.jsonl").write_text("".join(lines[8:72]))
    return FamilyRuns(tmp)


class FamilyRuns:
    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.finished: dict[tuple[str, str], tuple[Path, str]] = {}

    def cmd(self, family: str, stage: str, run_dir: Path) -> list[str]:
        return [str(Path(sys.executable).parent / "accelerate"), "launch", "--config_file",
                f"accelerate_configs/{LAUNCH_CONFIGS[stage]}.yaml", "--main_process_port", str(free_port()),
                "-m", "lfqa.train", "jobs/tiny-cpu.yaml", f"output.dir={run_dir}", f"model.name_or_path=tiny-{family}",
                *TINY, *JOB, f"data.train_files=[{self.tmp / 'train.jsonl'}]",
                f"data.validation_files=[{self.tmp / 'validation.jsonl'}]",
                f"model.cache_dir={self.tmp / 'models'}", f"data.cache_dir={self.tmp / 'datasets'}"]

    def done(self, family: str, stage: str) -> tuple[Path, str]:
        """(run folder, console output) of the uninterrupted run."""
        if (family, stage) not in self.finished:
            run_dir = self.tmp / f"{family}-{stage}"
            proc = subprocess.run(self.cmd(family, stage, run_dir), cwd=ROOT, env=lfqa_env(), capture_output=True,
                                  text=True, timeout=600)
            assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
            self.finished[family, stage] = (run_dir, proc.stdout + proc.stderr)
        return self.finished[family, stage]


def weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def max_difference(a: dict, b: dict) -> float:
    """Over the weights both hold: a ZeRO save also writes the tied copies (embeddings, output layer) that
    ``save_pretrained`` leaves out."""
    common = a.keys() & b.keys()
    assert common and all(k.endswith(TIED) for k in a.keys() ^ b.keys()), a.keys() ^ b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in common)


def train_losses(run_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if "train/loss" in r]
    assert len(steps) == len(set(steps)), f"a step was logged twice: {steps}"
    return {r["step"]: r["train/loss"] for r in records if "train/loss" in r}


def evaluate_alone(model_dir: Path):
    """Loss, ROUGE and answers of a saved model on the run's validation rows, in this one process."""
    from accelerate import Accelerator

    from lfqa.config import load_job
    from lfqa.evaluation import evaluate
    from lfqa.modeling import load_model, load_tokenizer, model_collator
    from lfqa.train import build_data

    job = load_job(model_dir / "job.yaml")
    model, tok = load_model(str(model_dir)), load_tokenizer(str(model_dir))
    val = build_data(job, tok, model.config, log=lambda _: None).eval
    return evaluate(model, tok, val, job.eval, Accelerator(cpu=True), model_collator(model, tok))


@pytest.mark.distributed
@pytest.mark.parametrize(("family", "stage"), [("bart", "ddp"), ("bart", "zero2"), ("t5", "ddp"), ("longt5", "zero2")])
def test_each_family_trains_on_two_processes(family, stage, runs):
    run_dir, output = runs.done(family, stage)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["num_processes"] == 2
    expected = "DistributedType.MULTI_CPU" if stage == "ddp" else "DistributedType.DEEPSPEED"
    assert summary["distributed_type"] == expected
    assert summary["ranks"] == {"rows_seen_per_rank_epoch0": [24, 24], "rows_seen_by_several_ranks_epoch0": 0}
    losses = train_losses(run_dir)
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert losses[STEPS] < losses[1]
    assert set(summary["eval_end"]["rouge"]) >= {"rouge1", "rouge2", "rougeL"}
    # LED's attention settings do not apply: said once, not silently dropped.
    assert output.count(f"this {MODEL_TYPES[family]} model keeps transformers' attention") == 1
    if family == "bart":  # one position table of 128 for both sides
        assert "data.max_input_tokens 256 is more than the model's 128 positions: using 128" in output
    else:  # relative positions: the job's limit rules
        assert "more than the model's" not in output and "inputs to 256 tokens" in output


@pytest.mark.distributed
@pytest.mark.parametrize("family", FAMILIES)
def test_resume_after_sigkill_matches_an_uninterrupted_run(family, runs, tmp_path):
    reference, _ = runs.done(family, STAGE[family])
    run_dir = tmp_path / "run"
    cmd = runs.cmd(family, STAGE[family], run_dir)
    proc = start_and_wait_for(cmd, run_dir / "checkpoints" / "step-00000004" / "COMPLETE", tmp_path / "first.log")
    kill_tree(proc)  # a node lost: no warning, no cleanup
    assert not (run_dir / "model").exists()
    resumed = subprocess.run(cmd, cwd=ROOT, env=lfqa_env(), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-5000:]
    assert json.loads((run_dir / "summary.json").read_text())["resumed_from"]["step"] in (4, 8)
    assert max_difference(weights(reference / "model"), weights(run_dir / "model")) <= 1e-6
    expected, got = train_losses(reference), train_losses(run_dir)
    assert got.keys() == expected.keys()
    assert all(got[s] == pytest.approx(expected[s], abs=1e-6) for s in expected), (expected, got)


@pytest.mark.distributed
@pytest.mark.parametrize("family", FAMILIES)
def test_export_answer_and_from_pretrained(family, runs, tmp_path, capsys):
    """The checkpoint exports to the final weights; the exported model reloads with plain transformers,
    reproduces the run's evaluation and answers through `lfqa answer`."""
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    from lfqa.answer import Answerer
    from lfqa.answer import main as answer_main
    from lfqa.export import main as export_main

    run_dir, _ = runs.done(family, STAGE[family])
    exported = tmp_path / "exported"
    assert export_main([str(run_dir / "checkpoints" / f"step-{STEPS:08d}"), "--out", str(exported)]) == 0
    assert max_difference(weights(exported), weights(run_dir / "model")) <= 1e-6

    model = AutoModelForSeq2SeqLM.from_pretrained(exported)
    tok = AutoTokenizer.from_pretrained(exported)
    assert model.config.model_type == MODEL_TYPES[family]
    # Each family's own decoder start: </s> for BART, <pad> (id 0) for T5 and LongT5, in training and decoding.
    start = tok.eos_token_id if family == "bart" else tok.pad_token_id
    assert model.config.decoder_start_token_id == model.generation_config.decoder_start_token_id == start
    if family != "bart":
        assert (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id) == (0, 1, None)

    summary = json.loads((run_dir / "summary.json").read_text())
    result = evaluate_alone(exported)
    assert result.loss == pytest.approx(summary["eval_end"]["loss"], abs=1e-4)
    assert result.rouge == pytest.approx(summary["eval_end"]["rouge"], abs=1e-6)

    # `lfqa answer` builds the input as evaluation did: the same answer to the same validation row.
    sample = result.samples[0]
    row = next(r for r in map(json.loads, BUNDLED_VALIDATION.read_text().splitlines())
               if r["question"] == sample["question"])
    capsys.readouterr()
    assert answer_main(["--model", str(exported), "--question", row["question"], "--context", *row["context"]]) == 0
    printed = capsys.readouterr().out.strip()
    assert printed == (sample["generated"] or "(empty answer: the model generated no text before its end-of-sequence "
                                              "token)")
    # The input limit: BART's position table, else (relative positions) the job's.
    assert Answerer(str(exported)).max_input_tokens == (128 if family == "bart" else 256)


@pytest.mark.distributed
def test_bart_under_zero2_and_zero3_trains_as_ddp_and_zero3_exports_and_evaluates(runs, tmp_path):
    from lfqa.export import main as export_main

    ddp = weights(runs.done("bart", "ddp")[0] / "model")
    assert max_difference(weights(runs.done("bart", "zero2")[0] / "model"), ddp) < 1e-4
    run_dir, _ = runs.done("bart", "zero3")
    checkpoint = run_dir / "checkpoints" / f"step-{STEPS:08d}"
    assert list((checkpoint / "pytorch_model").glob("*optim_states.pt")), "not a ZeRO checkpoint"
    assert max_difference(weights(run_dir / "model"), ddp) < 1e-4
    assert export_main([str(checkpoint), "--out", str(tmp_path / "exported")]) == 0
    assert max_difference(weights(tmp_path / "exported"), weights(run_dir / "model")) <= 1e-6
    # Generation under ZeRO-3 (synced_gpus, ranks in lockstep) gives what the model gives alone.
    summary = json.loads((run_dir / "summary.json").read_text())
    result = evaluate_alone(tmp_path / "exported")
    assert result.loss == pytest.approx(summary["eval_end"]["loss"], abs=1e-4)
    assert result.rouge == pytest.approx(summary["eval_end"]["rouge"], abs=1e-6)


# --- what each family decides, in this process (no launch) ---------------------------------------------------


@pytest.fixture(scope="module")
def tiny_parts():
    """One BPE trained on the bundled data, in each family's tokenizer conventions, and a model of each family."""
    from transformers import AutoModelForSeq2SeqLM

    from lfqa.config import TinyModelConfig
    from lfqa.modeling import _tiny_config, _tiny_tokenizer, _train_tiny_bpe

    tiny = TinyModelConfig(d_model=32, ffn_dim=64, encoder_layers=1, decoder_layers=1, max_input_tokens=128,
                           max_answer_tokens=64)
    vocab, merges = _train_tiny_bpe(tiny)
    parts = {}
    for family in ("led", *FAMILIES):
        tok = _tiny_tokenizer(family, vocab, merges, tiny.max_input_tokens)
        parts[family] = (tok, AutoModelForSeq2SeqLM.from_config(_tiny_config(family, tiny, tok)))
    return parts


def test_position_limits_come_from_each_config(tiny_parts):
    from lfqa.modeling import fit_limits, position_limits

    configs = {family: model.config for family, (_, model) in tiny_parts.items()}
    assert position_limits(configs["led"]) == (128, 64)  # a table each side
    assert position_limits(configs["bart"]) == (128, 128)  # one size for both
    assert position_limits(configs["t5"]) == position_limits(configs["longt5"]) == (None, None)  # relative
    assert fit_limits(configs["bart"], 4096, 96) == (128, 96)
    assert fit_limits(configs["t5"], 4096, 300) == (4096, 300)


def test_tokenizers_and_inputs_follow_each_familys_conventions(tiny_parts):
    from lfqa.data import encode_inputs

    question, passage = "Why is the sky blue?", "Light scatters. " * 100
    for family, (tok, model) in tiny_parts.items():
        t5_style = family in ("t5", "longt5")
        ids = tok("the sky")["input_ids"]
        bare = tok("the sky", add_special_tokens=False)["input_ids"]
        assert ids == (bare + [tok.eos_token_id] if t5_style else [tok.bos_token_id, *bare, tok.eos_token_id])
        if t5_style:
            assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id, tok.bos_token_id) == (0, 1, 2, None)
            assert model.config.decoder_start_token_id == 0  # T5 starts the decoder from <pad>
        else:
            assert model.config.decoder_start_token_id == tok.eos_token_id == 2
        encoded = encode_inputs(tok, [question], [[passage]], 64)
        cut = encoded["input_ids"][0]
        assert encoded["truncated"] == [True] and len(cut) == 64 and cut[-1] == tok.eos_token_id
        assert cut.count(tok.eos_token_id) == 1
        # Global attention on the question: the opening <s> (LED, BART) and the question's tokens, never </s>.
        question_ids = tok(f"question: {question}", add_special_tokens=False)["input_ids"]
        assert encoded["num_global"] == [len(question_ids) + (0 if t5_style else 1)]
        assert cut[:encoded["num_global"][0]] == ([] if t5_style else [tok.bos_token_id]) + question_ids


def test_only_led_gets_global_attention_and_window_padding(tiny_parts):
    from lfqa.modeling import model_collator

    for family, (tok, model) in tiny_parts.items():
        rows = [{"input_ids": [5] * 21, "num_global": 3, "labels": [7, 8]}, {"input_ids": [5] * 9, "num_global": 2,
                                                                               "labels": [7]}]
        batch = model_collator(model, tok)(rows)
        assert ("global_attention_mask" in batch) == (family == "led")
        assert batch["input_ids"].shape[1] == (32 if family == "led" else 24)  # LED's window 16, else 8
        loss = model(**batch).loss  # each family takes its batch as it is
        assert loss.isfinite()


def test_each_tiny_family_has_its_own_cache_folder(tmp_path):
    from lfqa.config import ModelConfig, TinyModelConfig
    from lfqa.modeling import TINY_FAMILIES, tiny_family_dir, tiny_model_dir

    tiny = TinyModelConfig(d_model=32, ffn_dim=64)
    folders = {name: tiny_family_dir(ModelConfig(name_or_path=name, cache_dir=str(tmp_path), tiny=tiny))
               for name in TINY_FAMILIES}
    assert folders["tiny-led"] == tiny_model_dir(ModelConfig(name_or_path="tiny-led", cache_dir=str(tmp_path),
                                                             tiny=tiny))
    assert len(set(folders.values())) == len(folders)
    assert all(folder.name.startswith(f"{name}-") for name, folder in folders.items())


@pytest.mark.parametrize(("model_type", "kind"), [("gpt2", "decoder-only"), ("bert", "encoder-only")])
def test_a_model_without_encoder_and_decoder_is_one_line(model_type, kind, tmp_path, capsys):
    from lfqa.answer import main as answer_main

    (tmp_path / "config.json").write_text(json.dumps({"model_type": model_type}))
    assert answer_main(["--model", str(tmp_path), "--question", "Why?", "--context", "x"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lfqa: error: "), err
    assert f"holds a {model_type} model, not a sequence-to-sequence (encoder-decoder) model" in err[0], kind
