from pathlib import Path

import pytest

from lfqa.config import ConfigError, JobConfig, dump_job, load_job, parse_override

ROOT = Path(__file__).resolve().parent.parent
JOBS = sorted((ROOT / "jobs").glob("*.yaml"))


def test_the_shipped_jobs_exist():
    names = {p.name for p in JOBS}
    assert {"tiny-cpu.yaml", "led-base-lfqa.yaml", "bart-large-eli5-style.yaml",
            "long-t5-tglobal-base-lfqa.yaml"} <= names


@pytest.mark.parametrize("path", JOBS, ids=lambda p: p.name)
def test_every_shipped_job_loads_and_round_trips(path, tmp_path):
    job = load_job(path)
    assert isinstance(job, JobConfig)
    # The resolved config a run saves (model/job.yaml) loads back to the same job.
    saved = tmp_path / "job.yaml"
    saved.write_text(dump_job(job))
    assert load_job(saved) == job


def test_the_real_job_uses_the_seed_settings():
    job = load_job(ROOT / "jobs/led-base-lfqa.yaml")
    assert job.model.name_or_path == "allenai/led-base-16384"
    assert job.data.dataset == "LLukas22/lfqa_preprocessed"
    assert job.data.max_answer_tokens == 512
    assert job.train.precision == "bf16" and job.model.gradient_checkpointing
    gen = job.eval.generation
    assert (gen.num_beams, gen.max_new_tokens, gen.min_new_tokens, gen.length_penalty, gen.no_repeat_ngram_size) == (
        4, 512, 100, 2.0, 3)


def test_the_other_families_jobs_use_their_familys_settings():
    """Same data as the LED job, each family's own limits, rate and precision."""
    led = load_job(ROOT / "jobs/led-base-lfqa.yaml")
    bart = load_job(ROOT / "jobs/bart-large-eli5-style.yaml")
    assert bart.model.name_or_path == "facebook/bart-large" and bart.data.max_input_tokens == 1024
    assert 3e-5 <= bart.train.learning_rate <= 5e-5 and bart.train.precision in ("bf16", "fp16")
    gen = bart.eval.generation
    assert (gen.num_beams, gen.no_repeat_ngram_size) == (4, 3) and gen.min_new_tokens >= 64
    long_t5 = load_job(ROOT / "jobs/long-t5-tglobal-base-lfqa.yaml")
    assert long_t5.model.name_or_path == "google/long-t5-tglobal-base" and long_t5.data.max_input_tokens == 16384
    assert long_t5.train.precision == "bf16" and 3e-4 <= long_t5.train.learning_rate <= 5e-4
    assert long_t5.eval.generation == led.eval.generation
    for job in (bart, long_t5):
        assert (job.data.dataset, job.data.fields, job.data.max_answer_tokens) == (
            led.data.dataset, led.data.fields, led.data.max_answer_tokens)
        assert job.checkpoint == led.checkpoint and job.output.dir != led.output.dir


def write(tmp_path, text: str) -> Path:
    path = tmp_path / "job.yaml"
    path.write_text(text)
    return path


BASE = "data:\n  train_files: [a.jsonl]\n  validation_files: [b.jsonl]\n"


def error_of(path, overrides=()) -> str:
    with pytest.raises(ConfigError) as info:
        load_job(path, overrides)
    message = str(info.value)
    assert "\n" not in message, "errors are one line"
    return message


def test_unknown_key_names_file_key_and_suggestion(tmp_path):
    path = write(tmp_path, BASE + "train:\n  learning_rat: 1.0e-4\n")
    msg = error_of(path)
    assert str(path) in msg and "unknown key 'train.learning_rat'" in msg and "train.learning_rate" in msg


def test_unknown_section(tmp_path):
    msg = error_of(write(tmp_path, BASE + "trainer:\n  x: 1\n"))
    assert "unknown key 'trainer'" in msg


def test_wrong_type_names_key_expected_and_got(tmp_path):
    msg = error_of(write(tmp_path, BASE + "data:\n  train_files: [a.jsonl]\n  validation_files: [b.jsonl]\n"
                                          "  batch_size: two\n"))
    assert "data.batch_size: expected int, got str 'two'" in msg


def test_bool_is_not_an_int_and_float_is_not_an_int(tmp_path):
    assert "train.epochs: expected int" in error_of(write(tmp_path, BASE + "train:\n  epochs: true\n"))
    assert "train.epochs: expected int" in error_of(write(tmp_path, BASE + "train:\n  epochs: 1.5\n"))


def test_yaml_scientific_notation_is_a_float(tmp_path):
    # PyYAML reads 3e-4 as a string; people write learning rates that way.
    job = load_job(write(tmp_path, BASE + "train:\n  learning_rate: 3e-4\n"))
    assert job.train.learning_rate == pytest.approx(3e-4)


def test_literal_choices(tmp_path):
    msg = error_of(write(tmp_path, BASE + "train:\n  precision: fp8\n"))
    assert "train.precision: expected one of 'fp32' | 'bf16' | 'fp16', got str 'fp8'" in msg


def test_impossible_values(tmp_path):
    assert "train.learning_rate: must be > 0" in error_of(write(tmp_path, BASE + "train:\n  learning_rate: 0\n"))
    assert "eval.generation.min_new_tokens" in error_of(
        write(tmp_path, BASE + "eval:\n  generation:\n    max_new_tokens: 10\n    min_new_tokens: 20\n"))
    assert "model.tiny.attention_window: must be an even number" in error_of(
        write(tmp_path, BASE + "model:\n  tiny:\n    attention_window: 15\n"))
    assert "model.encoder_attention: must be sdpa or eager, not 'flash'" in error_of(
        write(tmp_path, BASE + "model:\n  encoder_attention: flash\n"))


def test_data_source_must_be_exactly_one(tmp_path):
    msg = error_of(write(tmp_path, "data:\n  dataset: x/y\n  train_files: [a.jsonl]\n  validation_files: [b]\n"))
    assert "data.dataset: set exactly one of data.dataset and data.train_files" in msg
    msg = error_of(write(tmp_path, "data:\n  train_files: [a.jsonl]\n"))
    assert "data.validation_files: must be set" in msg


def test_section_given_a_scalar(tmp_path):
    assert "train: expected a mapping of TrainConfig keys, got int 3" in error_of(write(tmp_path, BASE + "train: 3\n"))


def test_list_items_are_checked(tmp_path):
    msg = error_of(write(tmp_path, "data:\n  train_files: [a.jsonl, 3]\n  validation_files: [b.jsonl]\n"))
    assert "data.train_files[1]: expected str, got int 3" in msg


def test_invalid_yaml_and_missing_file(tmp_path):
    assert "not valid YAML at line" in error_of(write(tmp_path, "train: [\n"))
    assert "cannot read job file" in error_of(tmp_path / "nope.yaml")


def test_overrides_apply_and_are_checked(tmp_path):
    path = write(tmp_path, BASE)
    job = load_job(path, ["train.learning_rate=3e-5", "data.batch_size=4", "eval.generation.num_beams=2",
                          "data.max_eval_samples=null", "output.dir=/tmp/x"])
    assert job.train.learning_rate == pytest.approx(3e-5)
    assert job.data.batch_size == 4 and job.eval.generation.num_beams == 2
    assert job.data.max_eval_samples is None and job.output.dir == "/tmp/x"
    msg = error_of(path, ["train.lr=1"])
    assert "(with overrides)" in msg and "unknown key 'train.lr'" in msg
    assert "expected dotted.key=value" in error_of(path, ["train.learning_rate"])
    assert "is not a section" in error_of(path, ["data.train_files.x=1"])


def test_parse_override_reads_yaml_values():
    assert parse_override("a.b=[1, 2]") == ("a.b", [1, 2])
    assert parse_override("a=true") == ("a", True)
    assert parse_override("a=hello world") == ("a", "hello world")
