import json
from collections import Counter

import numpy as np
import pytest
import torch

from lfqa.config import DataConfig, FieldsConfig
from lfqa.data import (
    DataError,
    LengthGroupedBatchSampler,
    Seq2SeqCollator,
    encode_inputs,
    format_input,
    get_path,
    normalise_row,
    read_files,
    read_split,
    tokenize_examples,
)


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


LFQA_ROW = {"question": "Why is Velmora famous?", "answer": "For its copper bridges.",
            "context": ["Velmora has copper bridges.", "Gimul has windmills."]}


# --- schema mapping -----------------------------------------------------------------------------------

def test_lfqa_schema():
    ex = normalise_row(LFQA_ROW, FieldsConfig())
    assert ex.question == "Why is Velmora famous?"
    assert ex.contexts == ["Velmora has copper bridges.", "Gimul has windmills."]


def test_document_string_layout():
    row = {"q": "What?", "a": "This.", "document": "One long document."}
    ex = normalise_row(row, FieldsConfig(question="q", answer="a", context="document"))
    assert (ex.question, ex.answer, ex.contexts) == ("What?", "This.", ["One long document."])


def test_passages_with_titles_layout():
    row = {"question": "Q?", "answer": "A.",
           "passages": [{"title": "Velmora", "text": "Copper bridges."}, {"text": "No title here."}]}
    ex = normalise_row(row, FieldsConfig(context="passages"))
    assert ex.contexts == ["Velmora: Copper bridges.", "No title here."]


def test_custom_passage_keys():
    row = {"question": "Q?", "answer": "A.", "docs": [{"name": "T", "body": "B."}]}
    ex = normalise_row(row, FieldsConfig(context="docs", passage_title="name", passage_text="body"))
    assert ex.contexts == ["T: B."]


def test_answer_nested_in_a_list_or_an_object():
    row = {"question": "Q?", "answers": [{"text": "First."}, {"text": "Second."}], "context": ["c"]}
    assert normalise_row(row, FieldsConfig(answer="answers.0.text")).answer == "First."
    row = {"question": "Q?", "answer": {"text": "Nested."}, "context": "c"}
    assert normalise_row(row, FieldsConfig(answer="answer.text")).answer == "Nested."
    row = {"question": "Q?", "answers": ["Plain."], "context": "c"}
    assert normalise_row(row, FieldsConfig(answer="answers.0")).answer == "Plain."


def test_get_path_errors():
    with pytest.raises(KeyError):
        get_path({"a": [1]}, "a.1")
    with pytest.raises(KeyError):
        get_path({"a": "text"}, "a.b")


@pytest.mark.parametrize("row, reason", [
    ({"answer": "A.", "context": []}, "missing question field 'question'"),
    ({"question": "  ", "answer": "A.", "context": []}, "empty question"),
    ({"question": "Q?", "answer": "", "context": []}, "empty answer"),
    ({"question": "Q?", "answer": 3, "context": []}, "answer field 'answer' is not a string"),
    ({"question": "Q?", "answer": "A."}, "missing context field 'context'"),
    ({"question": "Q?", "answer": "A.", "context": 7}, "context field 'context' is a int"),
    ({"question": "Q?", "answer": "A.", "context": [1, 2]}, "context field 'context' is a list"),
    ({"question": "Q?", "answer": "A.", "context": [" ", ""]}, "empty context"),
    ({"question": "Q?", "answer": "A.", "document": ""}, "missing context field 'context'"),
    (["not", "an", "object"], "row is not an object"),
])
def test_malformed_rows_give_a_reason(row, reason):
    result = normalise_row(row, FieldsConfig())
    assert isinstance(result, str) and result.startswith(reason)


def test_malformed_rows_are_counted_and_reported_with_file_and_row(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", [
        LFQA_ROW,
        "{not json",
        {"question": "Q?", "answer": "", "context": ["c"]},
        "",  # blank lines are not rows
        {"question": "Q?", "answer": "A.", "context": {"bad": 1}},
        LFQA_ROW,
    ])
    examples, report, _ = read_files([str(path)], FieldsConfig())
    assert len(examples) == 2
    assert report.rows_read == 5 and report.malformed_total == 3
    assert report.problems[0] == f"{path}:2: line is not valid JSON"
    assert report.problems[1] == f"{path}:3: empty answer"
    assert report.problems[2].startswith(f"{path}:5: context field 'context' is a dict")
    text = "\n".join(report.lines(512, 16384))
    assert "skipped 3 malformed rows" in text and f"{path}:2" in text


def test_a_file_without_usable_rows_is_an_error(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", ["{oops", {"question": "Q?"}])
    with pytest.raises(DataError, match=r"bad.jsonl: no usable rows \(2 malformed; first: .*bad.jsonl:1"):
        read_files([str(path)], FieldsConfig())


def test_json_and_parquet_files(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "rows.json").write_text(json.dumps({"data": [LFQA_ROW, LFQA_ROW]}))
    pq.write_table(pa.Table.from_pylist([LFQA_ROW] * 3), tmp_path / "rows.parquet")
    examples, report, _ = read_files([str(tmp_path / "rows.json"), str(tmp_path / "*.parquet")], FieldsConfig())
    assert len(examples) == 5 and report.rows_read == 5
    assert examples[4].contexts == LFQA_ROW["context"]


def test_unreadable_inputs_are_one_line_errors(tmp_path):
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="unsupported file type '.csv'"):
        read_files([str(tmp_path / "x.csv")], FieldsConfig())
    with pytest.raises(DataError, match="no file matches"):
        read_files([str(tmp_path / "*.jsonl")], FieldsConfig())
    (tmp_path / "broken.json").write_text("[1, 2")
    with pytest.raises(DataError, match="broken.json: not valid JSON"):
        read_files([str(tmp_path / "broken.json")], FieldsConfig())


def test_byte_order_marks_and_other_encodings(tmp_path):
    fields = FieldsConfig()
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b"\xef\xbb\xbf" + (json.dumps(LFQA_ROW) + "\n").encode() * 2)
    (tmp_path / "bom.json").write_bytes(b"\xef\xbb\xbf" + json.dumps([LFQA_ROW]).encode())
    examples, report, _ = read_files([str(bom), str(tmp_path / "bom.json")], fields)
    assert len(examples) == 3 and report.malformed_total == 0  # the first row is kept
    # A Latin-1 line is malformed (not silently read with replacement characters); the others are kept.
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_bytes((json.dumps(LFQA_ROW) + "\n").encode()
                      + json.dumps({**LFQA_ROW, "question": "Caf\xe9?"}, ensure_ascii=False).encode("latin-1") + b"\n")
    examples, report, _ = read_files([str(mixed)], fields)
    assert len(examples) == 1 and report.problems == [f"{mixed}:2: line is not UTF-8 text (byte 17)"]


def test_lfqa_cuts_long_inputs_without_transformers_warning_of_it(tokenizer, monkeypatch):
    from transformers import tokenization_utils_base

    warnings = []
    monkeypatch.setattr(tokenization_utils_base.logger, "warning", lambda msg, *a, **k: warnings.append(msg))
    tokenizer.deprecation_warnings.pop("sequence-length-is-longer-than-the-specified-maximum", None)
    encoded = encode_inputs(tokenizer, ["Why?"], [["copper " * 3000]], 64)
    assert encoded["truncated"] == [True] and len(encoded["input_ids"][0]) == 64
    assert not [w for w in warnings if "sequence length is longer" in str(w)]


def test_hub_path_reads_a_local_dataset_folder_through_load_dataset(tmp_path):
    # data.dataset goes through datasets.load_dataset, which also takes a local folder: the same code as a
    # hub id, without the network.
    folder = tmp_path / "my_lfqa"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", [LFQA_ROW, {"question": "Q?"}])
    write_jsonl(folder / "validation.jsonl", [LFQA_ROW])
    cfg = DataConfig(dataset=str(folder))
    examples, report, fingerprint = read_split(cfg, "train")
    assert len(examples) == 1 and report.malformed_total == 1 and fingerprint
    assert "row 1: missing answer field" in report.problems[0]


def test_unreachable_hub_dataset_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = DataConfig(dataset="LLukas22/lfqa_preprocessed")
    with pytest.raises(DataError, match=r"cannot load data set 'LLukas22/lfqa_preprocessed' split 'train'"):
        read_split(cfg, "train")


# --- tokenisation -------------------------------------------------------------------------------------

def test_input_format():
    assert format_input("Why?", ["A.", "B."]) == "question: Why? context: A. B."


def tokenised(tmp_path, tokenizer, rows, **kw):
    path = write_jsonl(tmp_path / "rows.jsonl", rows)
    cfg = DataConfig(train_files=[str(path)], validation_files=[str(path)], cache_dir=str(tmp_path / "cache"),
                     global_attention=kw.pop("global_attention", "question"))
    examples, report, fp = read_files(cfg.train_files, cfg.fields)
    logs = []
    ds = tokenize_examples(examples, tokenizer, cfg, report, fp, max_input_tokens=kw.get("max_input", 1024),
                           max_answer_tokens=kw.get("max_answer", 512), limit=kw.get("limit"), log=logs.append)
    return ds, report, logs


def test_long_answers_are_dropped_and_long_inputs_truncated(tmp_path, tokenizer):
    short = dict(LFQA_ROW)
    long_answer = dict(LFQA_ROW, answer=" ".join(["bridges"] * 100))
    long_input = dict(LFQA_ROW, context=["copper " * 300])
    ds, report, _ = tokenised(tmp_path, tokenizer, [short, long_answer, long_input, short], max_input=64,
                              max_answer=30)
    assert report.dropped_long_answer == 1 and report.truncated_inputs == 1 and report.kept == 3
    assert len(ds) == 3
    assert ds["row_id"] == [0, 2, 3]
    assert max(len(x) for x in ds["input_ids"]) == 64
    assert ds[1]["input_ids"][-1] == tokenizer.eos_token_id  # cut inputs still end with </s>
    text = "\n".join(report.lines(30, 64))
    assert "dropped 1 row whose answer is longer than 30 tokens" in text
    assert "truncated 1 input to 64 tokens" in text


def test_labels_and_global_attention_positions(tmp_path, tokenizer):
    ds, _, _ = tokenised(tmp_path, tokenizer, [LFQA_ROW])
    row = ds[0]
    assert tokenizer.decode(row["labels"], skip_special_tokens=True) == LFQA_ROW["answer"]
    assert (row["input_length"], row["label_length"]) == (len(row["input_ids"]), len(row["labels"]))
    assert row["labels"][0] == tokenizer.bos_token_id and row["labels"][-1] == tokenizer.eos_token_id
    # Global attention covers <s> and exactly the tokens of "question: <question>".
    head = tokenizer.decode(row["input_ids"][1:row["num_global"]])
    assert head == "question: " + LFQA_ROW["question"]
    assert tokenizer.decode(row["input_ids"][row["num_global"]:]).startswith(" context:")
    ds, _, _ = tokenised(tmp_path, tokenizer, [LFQA_ROW], global_attention="first_token")
    assert ds[0]["num_global"] == 1


def test_tokenisation_is_cached(tmp_path, tokenizer):
    rows = [LFQA_ROW] * 3
    _, _, logs = tokenised(tmp_path, tokenizer, rows)
    assert "tokenised" in logs[0] and "cache" not in logs[0].split(":")[1].split()[0]
    files = sorted((tmp_path / "cache").glob("*.arrow"))
    assert len(files) == 1
    ds, _, logs = tokenised(tmp_path, tokenizer, rows)
    assert "loaded tokenised rows from cache" in logs[0]
    assert len(ds) == 3
    # Different data: a new cache file, not a stale hit.
    tokenised(tmp_path, tokenizer, rows + [LFQA_ROW])
    assert len(list((tmp_path / "cache").glob("*.arrow"))) == 2


def test_limit_keeps_the_first_usable_rows(tmp_path, tokenizer):
    ds, report, _ = tokenised(tmp_path, tokenizer, [LFQA_ROW] * 5, limit=2)
    assert len(ds) == 2 and report.kept == 2 and report.limited_to == 2


# --- batching -----------------------------------------------------------------------------------------

def test_collator_pads_to_the_window_multiple_and_masks_labels():
    rows = [{"input_ids": [0, 5, 6, 2], "labels": [0, 7, 2], "num_global": 2},
            {"input_ids": list(range(10, 27)), "labels": [0, 2], "num_global": 3}]
    batch = Seq2SeqCollator(pad_token_id=1, pad_to_multiple_of=16)(rows)
    assert batch["input_ids"].shape == (2, 32)  # 17 tokens -> 32, never a fixed maximum
    assert batch["attention_mask"][0].tolist() == [1] * 4 + [0] * 28
    assert (batch["input_ids"][0, 4:] == 1).all()
    assert batch["global_attention_mask"][0, :2].tolist() == [1, 1] and batch["global_attention_mask"][0].sum() == 2
    assert batch["global_attention_mask"][1].sum() == 3
    assert batch["labels"].tolist() == [[0, 7, 2], [0, 2, -100]]
    exact = Seq2SeqCollator(pad_token_id=1, pad_to_multiple_of=16)([rows[0]])
    assert exact["input_ids"].shape == (1, 16)


def lengths(n, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(50, 1000, n), rng.integers(10, 300, n)


def test_sampler_is_deterministic_and_covers_every_row_once():
    inp, lab = lengths(103)
    a = LengthGroupedBatchSampler(inp, lab, 4, window=16, group_size=8, seed=3)
    b = LengthGroupedBatchSampler(inp, lab, 4, window=16, group_size=8, seed=3)
    assert list(a) == list(b)
    flat = [i for batch in a for i in batch]
    assert sorted(flat) == list(range(103)) and len(a) == 26
    a.set_epoch(1)
    assert list(a) != list(b)
    c = LengthGroupedBatchSampler(inp, lab, 4, window=16, group_size=8, seed=4)
    assert list(c) != list(b)


def padding_efficiency(sampler, inp, lab, window):
    """(encoder, decoder) real / padded tokens over an epoch of batches."""
    enc_pad = enc_real = dec_pad = dec_real = 0
    for batch in sampler:
        enc_pad += -(-max(inp[batch]) // window) * window * len(batch)
        dec_pad += max(lab[batch]) * len(batch)
        enc_real += inp[batch].sum()
        dec_real += lab[batch].sum()
    return enc_real / enc_pad, dec_real / dec_pad


def test_length_grouping_reduces_padding():
    inp, lab = lengths(512)
    # A small window: inputs sorted into tight buckets.
    grouped = padding_efficiency(LengthGroupedBatchSampler(inp, lab, 8, window=16, group_size=16), inp, lab, 16)
    plain = padding_efficiency(LengthGroupedBatchSampler(inp, lab, 8, window=16, group_by_length=False), inp,
                               lab, 16)
    assert grouped[0] > 0.9 and plain[0] < 0.65
    # A wide window (LED pads to it anyway): answers sorted inside each window bucket cut decoder padding.
    grouped = padding_efficiency(LengthGroupedBatchSampler(inp, lab, 8, window=256, group_size=16), inp, lab, 256)
    plain = padding_efficiency(LengthGroupedBatchSampler(inp, lab, 8, window=256, group_by_length=False), inp,
                               lab, 256)
    assert grouped[1] > plain[1] + 0.15 and grouped[0] > plain[0] + 0.15


@pytest.mark.parametrize("rows", [96, 97, 99])
def test_rank_split_through_accelerate_covers_every_row_in_equal_shares(rows):
    # Training hands the sampler to accelerate, which deals batches out to the ranks (BatchSamplerShard).
    # With a short last batch (97, 99 rows) no round of batches may be lost, whatever the shuffle.
    from accelerate.data_loader import BatchSamplerShard

    inp, lab = lengths(rows)
    for seed in range(10):
        sampler = LengthGroupedBatchSampler(inp, lab, 4, window=16, group_size=4, seed=seed)
        batches = list(sampler)
        assert all(len(b) == 4 for b in batches[:-1])
        shards = [BatchSamplerShard(sampler, num_processes=2, process_index=r) for r in (0, 1)]
        taken = [list(s) for s in shards]
        assert len(taken[0]) == len(taken[1]) == len(shards[0]) == -(-rows // 8)
        assert {i for t in taken for b in t for i in b} == set(range(rows))
        assert taken[0][: rows // 8] == batches[0::2][: rows // 8]
        assert list(sampler) == batches  # padding the last round did not change the sampler's plan
        if rows % 8 == 0:
            assert not {i for b in taken[0] for i in b} & {i for b in taken[1] for i in b}


def test_collated_batch_trains_a_tiny_led(tmp_path, tokenizer, tiny_model_path):
    from lfqa.modeling import attention_window, load_model

    model = load_model(str(tiny_model_path))
    ds, _, _ = tokenised(tmp_path, tokenizer, [LFQA_ROW, dict(LFQA_ROW, question="A much longer question "
                                                                        "about bridges?")])
    batch = Seq2SeqCollator(tokenizer.pad_token_id, attention_window(model))([ds[0], ds[1]])
    assert batch["input_ids"].shape[1] % attention_window(model) == 0
    loss = model(**batch).loss
    assert torch.isfinite(loss)
    loss.backward()
    assert Counter(p.grad is not None for p in model.parameters())[True] > 0


# --- token-budget batching ------------------------------------------------------------------------------

def lfqa_like_lengths(n, seed=0):
    """Inputs mostly 650-1,000 tokens with a long tail, answers log-normal around 212 (at most 512)."""
    rng = np.random.default_rng(seed)
    kind = rng.random(n)
    inputs = np.where(kind < 0.8, rng.integers(650, 1001, n),
                      np.where(kind < 0.9, rng.integers(300, 650, n), 1000 + rng.exponential(1000, n).astype(int)))
    answers = np.clip(np.exp(rng.normal(np.log(212), 0.6, n)).astype(int), 8, 512)
    return inputs, answers


def token_sampler(inp, lab, **kw):
    kw = {"window": 256, "group_size": 64, "max_tokens": 4096, "seed": 3, **kw}
    return LengthGroupedBatchSampler(inp, lab, kw.pop("batch_size", 8), **kw)


def test_token_budget_batches_cover_every_row_once_and_respect_the_budget():
    inp, lab = lfqa_like_lengths(1000)
    inp[7] = 9000  # alone over the budget: a batch of its own
    sampler = token_sampler(inp, lab)
    batches = list(sampler)
    assert sorted(i for b in batches for i in b) == list(range(1000))
    assert len(sampler) == len(batches)
    assert [7] in batches
    for batch in batches:
        assert 1 <= len(batch) <= 8
        assert sampler.batch_tokens(batch) <= 4096 or len(batch) == 1
        # Never two window buckets in one batch: that would pad every input to the larger one.
        assert len({-(-int(inp[i]) // 256) for i in batch}) == 1
    # Batches really are filled: most could not take one more row of their bucket.
    assert np.mean([len(b) for b in batches]) > 2.4


def test_token_budget_batches_of_a_model_without_a_window_share_64_token_buckets(tiny_model_path):
    """BART and T5 pad to 8: exact-length buckets would leave nearly every batch with one row."""
    from types import SimpleNamespace

    from lfqa.modeling import load_model
    from lfqa.train import NO_WINDOW_BUCKET, sampler_window

    assert sampler_window(load_model(str(tiny_model_path))) == 16  # LED: its window
    assert sampler_window(SimpleNamespace(config=SimpleNamespace())) == NO_WINDOW_BUCKET == 64
    inp, lab = lfqa_like_lengths(1000)
    exact = list(token_sampler(inp, lab, window=8))
    sampler = token_sampler(inp, lab, window=NO_WINDOW_BUCKET)
    batches = list(sampler)
    assert sorted(i for b in batches for i in b) == list(range(1000))
    for batch in batches:
        assert sampler.batch_tokens(batch) <= 4096 or len(batch) == 1
    assert np.mean([len(b) for b in batches]) > 2.4 > np.mean([len(b) for b in exact])


def test_token_budget_is_deterministic_per_seed_and_epoch_with_an_exact_length():
    inp, lab = lfqa_like_lengths(700)
    a, b = token_sampler(inp, lab), token_sampler(inp, lab)
    for epoch in range(3):
        a.set_epoch(epoch)
        b.set_epoch(epoch)
        # len() before iterating is the epoch's own count (a resumed run skips the first k batches of it).
        assert len(a) == len(list(a)) == len(b)
        assert list(a) == list(b)
        assert sorted(i for batch in a for i in batch) == list(range(700))
    a.set_epoch(0)
    b.set_epoch(1)
    assert list(a) != list(b)
    assert list(a) != list(token_sampler(inp, lab, seed=4))
    # What a resumed run sees after skipping k batches is what the interrupted run would have trained on next.
    from accelerate.data_loader import SkipBatchSampler

    b.set_epoch(0)
    assert list(SkipBatchSampler(b, skip_batches=5)) == list(a)[5:]


def test_token_budget_reaches_the_padding_targets_on_lfqa_like_lengths():
    inp, lab = lfqa_like_lengths(5000)
    window_bound = inp.sum() / (-(-inp // 256) * 256).sum()
    encoder, decoder = padding_efficiency(token_sampler(inp, lab), inp, lab, 256)
    assert encoder == pytest.approx(window_bound)  # only the window's own padding is left
    assert encoder >= 0.88 and decoder >= 0.85
    # Sorting by answer length inside each window bucket is what makes the decoder efficient.
    ungrouped = padding_efficiency(token_sampler(inp, lab, group_by_length=False), inp, lab, 256)
    assert ungrouped[1] < decoder - 0.15 and ungrouped[0] < encoder


def test_token_budget_without_grouping_keeps_the_shuffled_order():
    inp, lab = lfqa_like_lengths(300)
    sampler = token_sampler(inp, lab, group_by_length=False, shuffle=False)
    assert [i for b in sampler for i in b] == list(range(300))
    assert all(sampler.batch_tokens(b) <= 4096 or len(b) == 1 for b in sampler)


def test_fixed_and_token_batches_tell_accelerate_their_size():
    inp, lab = lengths(50)
    assert LengthGroupedBatchSampler(inp, lab, 4).batch_size == 4
    # None is accelerate's "batches of varying size": it then keeps every round instead of dropping short ones.
    assert LengthGroupedBatchSampler(inp, lab, 4, max_tokens=2048).batch_size is None
    with pytest.raises(ValueError, match="max_tokens"):
        LengthGroupedBatchSampler(inp, lab, 4, max_tokens=0)


@pytest.mark.parametrize("rows", [200, 201, 333])
def test_token_budget_rank_split_through_accelerate_drops_nothing(rows):
    from accelerate.data_loader import BatchSamplerShard

    inp, lab = lfqa_like_lengths(rows, seed=rows)
    for seed in range(5):
        sampler = token_sampler(inp, lab, seed=seed)
        batches = list(sampler)
        shards = [BatchSamplerShard(sampler, num_processes=2, process_index=r) for r in (0, 1)]
        taken = [list(s) for s in shards]
        # Equal batch counts per rank (no rank waits for a collective the other never joins), every row trained.
        assert len(taken[0]) == len(taken[1]) == len(shards[0]) == -(-len(batches) // 2)
        assert {i for t in taken for b in t for i in b} == set(range(rows))
        assert taken[0][: len(batches) // 2] == batches[0::2][: len(batches) // 2]
