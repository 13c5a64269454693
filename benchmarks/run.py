"""Training throughput: the seed's recipe vs a tuned HF Trainer vs lfqa's own loop, in one run.

Trains the same randomly initialised LED (or BART, T5, LongT5: the family presets) on the same synthetic rows,
whose input and answer lengths follow the LFQA data (inputs mostly 650-1,000 tokens with a long tail, answers
about 220 tokens on average), three ways, each in its own process (so peak memory is per variant):

  a  seed   Seq2SeqTrainer as the seed blog post ran it: inputs padded to 8,192 tokens, labels to 512,
            batch 2, gradient checkpointing, global attention on token 0.
  b  tuned  Seq2SeqTrainer tuned as the docs suggest: dynamic padding (DataCollatorForSeq2Seq), length-grouped
            sampling (train_sampling_strategy="group_by_length"), batch 2, no gradient checkpointing.
  c  lfqa   lfqa's real entry point (lfqa.train.run on a job config): window-bucketed, answer-sorted batches
            filled up to a token budget (data.max_tokens_per_batch).

Same model init, rows (a takes the first --seed-samples of them: every seed batch has the same padded shape, so
fewer rows measure its rate equally well), optimizer (AdamW, lr 5e-5, weight decay 0.01, clip 1.0, linear
decay, no warm-up) and precision. Prints a Markdown table (samples/s, real tokens/s, padding efficiency,
peak memory, ratios c/a and c/b) and writes it to --out.

    make bench                                         # CPU, the 'small' LED (6+6 layers, d_model 256)
    python benchmarks/run.py --samples 64 --seed-samples 4
    python benchmarks/run.py --preset tiny --samples 8 --seed-samples 2 --out /tmp/bench.md   # seconds
    python benchmarks/run.py --device cuda --precision bf16 --preset led-base --samples 2000  # GPU, with MFU
    python benchmarks/run.py --device cuda --precision bf16 --preset long-t5-base --samples 2000  # vs LongT5
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from anywhere: `python benchmarks/run.py`
    sys.path.insert(0, str(ROOT))

VARIANTS = {
    "a": "seed recipe: Seq2SeqTrainer, pad to 8192/512, batch 2, grad. checkpointing",
    "b": "tuned Trainer: dynamic padding, group_by_length, batch 2",
    "c": "lfqa loop: window buckets + answer sort, token budget",
    "d": "c without lfqa's speed-ups: transformers' LED attention, for-loop AdamW, glibc returns freed memory",
}
# d is an ablation (--variants abcd): what c gains from model.encoder_attention=sdpa, train.fused_optimizer
# and train.cpu_keep_freed_memory, against the same loop and batching.
ABLATION = {"model": {"encoder_attention": "eager"},
            "train": {"fused_optimizer": False, "cpu_keep_freed_memory": False}}
SEED_MAX_INPUT, SEED_MAX_ANSWER = 8192, 512
MAX_ANSWER_TOKENS = 512
LED_VOCAB = 50265  # allenai/led-base-16384's vocabulary: the LM head and embeddings cost what they cost there
T5_VOCAB = 32128  # T5's, Flan-T5's and LongT5's


@dataclass
class Preset:
    d_model: int
    layers: int
    heads: int
    ffn_dim: int
    window: int
    """LED's attention window (0 for the other families)."""
    vocab_size: int | None  # None: the benchmark tokenizer's own (small) vocabulary
    max_tokens_per_batch: int
    """lfqa's token budget for this size (c)."""
    max_batch_size: int
    """lfqa's data.batch_size: the most rows in one token-budget batch."""
    family: str = "led"
    """led, bart, t5 (Flan-T5's gated-GELU layout) or longt5 (transient-global): the config build_model makes."""
    max_positions: int = 1024
    """BART's one position table: inputs are cut to it, as lfqa cuts them for facebook/bart-*."""
    local_radius: int = 127
    """LongT5: tokens on either side in the local band (google/long-t5-tglobal-base's)."""
    global_block_size: int = 16
    """LongT5: one transient global token per this many inputs."""


PRESETS = {
    # Seconds on a laptop: for the test and smoke runs.
    "tiny": Preset(d_model=64, layers=2, heads=2, ffn_dim=128, window=16, vocab_size=None,
                   max_tokens_per_batch=4096, max_batch_size=8),
    # The size DESIGN.md's CPU numbers were measured with.
    "small": Preset(d_model=256, layers=6, heads=4, ffn_dim=1024, window=256, vocab_size=LED_VOCAB,
                    max_tokens_per_batch=4096, max_batch_size=8),
    # allenai/led-base-16384's shape (~162M parameters), for a GPU.
    "led-base": Preset(d_model=768, layers=6, heads=12, ffn_dim=3072, window=1024, vocab_size=LED_VOCAB,
                       max_tokens_per_batch=16384, max_batch_size=16),
    # The other families lfqa trains, to compare with LED on the same rows: tiny ones for tests, small ones
    # beside "small" on CPU, the real base shapes for a GPU.
    "tiny-bart": Preset(d_model=64, layers=2, heads=2, ffn_dim=128, window=0, vocab_size=None,
                        max_tokens_per_batch=4096, max_batch_size=8, family="bart"),
    "tiny-longt5": Preset(d_model=64, layers=2, heads=2, ffn_dim=128, window=0, vocab_size=None,
                          max_tokens_per_batch=4096, max_batch_size=8, family="longt5", local_radius=8,
                          global_block_size=16),
    "small-bart": Preset(d_model=256, layers=6, heads=4, ffn_dim=1024, window=0, vocab_size=LED_VOCAB,
                         max_tokens_per_batch=4096, max_batch_size=8, family="bart"),
    "small-t5": Preset(d_model=256, layers=6, heads=4, ffn_dim=1024, window=0, vocab_size=T5_VOCAB,
                       max_tokens_per_batch=4096, max_batch_size=8, family="t5"),
    "small-longt5": Preset(d_model=256, layers=6, heads=4, ffn_dim=1024, window=0, vocab_size=T5_VOCAB,
                           max_tokens_per_batch=4096, max_batch_size=8, family="longt5"),
    # facebook/bart-base's shape (~140M parameters; inputs cut to its 1,024 positions), for a GPU.
    "bart-base": Preset(d_model=768, layers=6, heads=12, ffn_dim=3072, window=0, vocab_size=LED_VOCAB,
                        max_tokens_per_batch=16384, max_batch_size=16, family="bart"),
    # google/long-t5-tglobal-base's shape (12+12 layers, gated-GELU FFN 2,048; ~223M parameters, as transformers
    # 5 ties its LM head), for a GPU.
    "long-t5-base": Preset(d_model=768, layers=12, heads=12, ffn_dim=2048, window=0, vocab_size=T5_VOCAB,
                           max_tokens_per_batch=16384, max_batch_size=16, family="longt5"),
}
LED_PRESETS = sorted(name for name, preset in PRESETS.items() if preset.family == "led")
"""The presets of the LED-only benchmarks (longest_input.py, profile_step.py: LED's attention kernels)."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="benchmarks/run.py",
        description=__doc__.split("\n\n")[0] + " See benchmarks/README.md.",
        epilog="Variants:\n" + "\n".join(f"  {k}  {v}" for k, v in VARIANTS.items()) + "\n\n"
               "Examples:\n"
               "  make bench\n"
               "  make bench BENCH_ARGS='--samples 64 --seed-samples 4'\n"
               "  python benchmarks/run.py --preset tiny --samples 8 --seed-samples 2 --out /tmp/bench.md\n"
               "  python benchmarks/run.py --device cuda --precision bf16 --preset led-base --samples 2000",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--samples", type=_positive, default=160,
                        help="training rows for b and c, one epoch each (default: 160; about 2 min each on 2 idle "
                             "cores)")
    parser.add_argument("--seed-samples", type=_positive, default=8,
                        help="rows for a, the slow seed recipe (default: 8; about 1 min on 2 idle cores); at most "
                             "--samples")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="small",
                        help="model family and size: tiny (LED, d 64, 2+2 layers, window 16), small (LED, d 256, "
                             "6+6, window 256; default), led-base (d 768, 6+6, window 1024, ~162M parameters); "
                             "small-bart, small-t5, small-longt5 (the small shape in each family), bart-base "
                             "(1,024 positions, ~139M), long-t5-base (12+12 layers, transient-global, ~223M); "
                             "tiny-bart, tiny-longt5")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="cpu (default) or cuda: one GPU, which the variants share, taking turns")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                        help="the same for every variant (default: fp32)")
    parser.add_argument("--variants", default="abc",
                        help="which of a, b, c, d to run (default: abc; d is c's ablation)")
    parser.add_argument("--max-tokens", type=_positive, default=None,
                        help="lfqa's token budget per batch (default: the preset's)")
    parser.add_argument("--max-batch-size", type=_positive, default=None,
                        help="lfqa's most rows per batch (default: the preset's)")
    parser.add_argument("--trainer-batch-size", type=_positive, default=2,
                        help="batch size of a and b (default: 2, the seed's)")
    parser.add_argument("--trainer-pad-multiple", type=_positive, default=None,
                        help="b pads inputs and labels to a multiple of this (default: to the longest row)")
    parser.add_argument("--sequential", action="store_true",
                        help="run the variants one after the other instead of interleaving their steps (less "
                             "memory; only fair on an otherwise idle machine)")
    parser.add_argument("--seed", type=int, default=0, help="data, model init and shuffling seed (default: 0)")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="the device's dense peak TFLOP/s at --precision, for MFU (default: known GPUs in "
                             "bf16; none on CPU)")
    parser.add_argument("--out", type=Path, default=None,
                        help="Markdown file to write (default: benchmarks/results/<device>-<date>.md)")
    parser.add_argument("--work-dir", type=Path, default=None,
                        help="keep the model, data, logs and run folders here (default: a temporary folder)")
    parser.add_argument("--worker", choices=sorted(VARIANTS), help=argparse.SUPPRESS)
    return parser


def _positive(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


# --- the synthetic data ---------------------------------------------------------------------------------


def lfqa_lengths(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Input and answer token counts shaped like LFQA (DESIGN.md section 3).

    Inputs: 80% between 650 and 1,000 tokens, 10% shorter (300-650), 10% a long tail (1,000 + an exponential
    with mean 1,000, at most 8,192); mean about 910. Answers: log-normal (median 212), at most 512 (the filter
    the seed applied), at least 8; mean about 222.
    """
    rng = np.random.default_rng([seed, 1])
    kind = rng.random(n)
    inputs = np.where(kind < 0.8, rng.integers(650, 1001, n),
                      np.where(kind < 0.9, rng.integers(300, 650, n),
                               np.minimum(1000 + rng.exponential(1000, n).astype(int), SEED_MAX_INPUT)))
    answers = np.exp(rng.normal(np.log(212), 0.6, n)).astype(int)
    while (long := answers > MAX_ANSWER_TOKENS).any():
        answers[long] = np.exp(rng.normal(np.log(212), 0.6, int(long.sum()))).astype(int)
    return inputs, np.maximum(answers, 8)


def single_token_words(tokenizer) -> list[str]:
    """Words that the tokenizer encodes as one token after a space: text of exactly N tokens is N of them."""
    words = []
    for token in tokenizer.get_vocab():
        word = token[1:]
        if token.startswith("\u0120") and len(word) >= 3 and word.isalpha() and word.islower():
            if len(tokenizer(" " + word, add_special_tokens=False)["input_ids"]) == 1:
                words.append(word)
    if len(words) < 50:
        raise RuntimeError(f"only {len(words)} single-token words in the tokenizer's vocabulary")
    return sorted(words)


def synthetic_rows(n: int, seed: int, tokenizer) -> list[dict]:
    """LFQA-schema rows (question, answer, context passages) of the lengths from :func:`lfqa_lengths`."""
    from lfqa.data import format_input

    words = single_token_words(tokenizer)
    rng = np.random.default_rng([seed, 2])
    input_lengths, answer_lengths = lfqa_lengths(n, seed)
    rows = []
    for target_in, target_out in zip(input_lengths.tolist(), answer_lengths.tolist()):
        question = " ".join(rng.choice(words, int(rng.integers(6, 16))))
        # Every context word is one token: the rest of the input is "<s>question: ... context:" and "</s>".
        overhead = len(tokenizer(format_input(question, [words[0]]))["input_ids"]) - 1
        context = rng.choice(words, max(1, target_in - overhead)).tolist()
        cuts = sorted(rng.choice(np.arange(1, len(context)), min(len(context) - 1, int(rng.integers(2, 7))),
                                 replace=False).tolist()) if len(context) > 1 else []
        passages = [" ".join(context[a:b]) for a, b in zip([0, *cuts], [*cuts, len(context)])]
        answer = " ".join(rng.choice(words, max(1, target_out - 2)))  # plus <s> and </s>
        rows.append({"question": question, "answer": answer, "context": passages})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


# --- the model ------------------------------------------------------------------------------------------


@dataclass
class BuiltModel:
    model_dir: Path
    params: int
    input_limit: int
    """Most input tokens the model takes (BART's position table), else lfqa's 16,384."""
    pad_multiple: int
    """What lfqa's collator pads inputs to (LED's window, else 8)."""
    window: int
    """LED's attention window, which it pads to inside and lfqa's sampler buckets by; 1 for other families."""
    global_attention: bool
    """Whether the model takes a global_attention_mask (LED)."""


def build_model(preset: Preset, out_dir: Path, seed: int) -> BuiltModel:
    """The benchmark tokenizer (lfqa's tiny byte-level BPE, trained locally, in the family's conventions) and a
    random model of ``preset``'s family and shape."""
    import torch
    from transformers import AutoModelForSeq2SeqLM

    from lfqa import modeling
    from lfqa.config import TinyModelConfig

    tok_dir = modeling.build_tiny_model(TinyModelConfig(), out_dir / "tokenizer", preset.family)
    tokenizer = modeling.load_tokenizer(str(tok_dir))
    config = family_config(preset, tokenizer)
    input_limit, _ = modeling.fit_limits(config, 16384, MAX_ANSWER_TOKENS)
    # the model's own limit: the tiny model's would only warn about long rows
    tokenizer.model_max_length = input_limit
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = AutoModelForSeq2SeqLM.from_config(config)
    model_dir = out_dir / "model"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    return BuiltModel(model_dir, sum(p.numel() for p in model.parameters()), input_limit,
                      modeling.pad_multiple(model), modeling.attention_window(model),
                      modeling.takes_global_attention(model))


def family_config(preset: Preset, tokenizer):
    """The transformers config of ``preset``, with the tokenizer's special tokens and each family's decoder
    start (LED and BART: </s>; T5 and LongT5: <pad>)."""
    from transformers import BartConfig, LEDConfig, LongT5Config, T5Config

    vocab = max(len(tokenizer), preset.vocab_size or 0)
    tokens = dict(pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    if preset.family in ("t5", "longt5"):
        # Flan-T5's and long-t5-tglobal-base's layout: gated-GELU feed-forward, no decoder output scaling
        # (tie_word_embeddings false; transformers 5 ties the LM head all the same)
        shape = dict(vocab_size=vocab, d_model=preset.d_model, d_kv=preset.d_model // preset.heads,
                     num_heads=preset.heads, d_ff=preset.ffn_dim, num_layers=preset.layers,
                     num_decoder_layers=preset.layers, feed_forward_proj="gated-gelu", tie_word_embeddings=False,
                     decoder_start_token_id=tokenizer.pad_token_id, **tokens)
        if preset.family == "t5":
            return T5Config(**shape)
        return LongT5Config(encoder_attention_type="transient-global", local_radius=preset.local_radius,
                            global_block_size=preset.global_block_size, **shape)
    shape = dict(vocab_size=vocab, d_model=preset.d_model, encoder_layers=preset.layers, decoder_layers=preset.layers,
                 encoder_attention_heads=preset.heads, decoder_attention_heads=preset.heads,
                 encoder_ffn_dim=preset.ffn_dim, decoder_ffn_dim=preset.ffn_dim, bos_token_id=tokenizer.bos_token_id,
                 decoder_start_token_id=tokenizer.eos_token_id, **tokens)
    if preset.family == "bart":
        return BartConfig(max_position_embeddings=preset.max_positions, **shape)
    return LEDConfig(attention_window=preset.window, max_encoder_position_embeddings=16384,
                     max_decoder_position_embeddings=1024, **shape)


def describe_model(preset: Preset, config, params: int) -> str:
    """The table's model line."""
    if preset.family in ("t5", "longt5"):
        kind = "T5 (Flan-T5 layout)"
        if preset.family == "longt5":
            kind = (f"LongT5 transient-global (local radius {config.local_radius}, a global token per "
                    f"{config.global_block_size} inputs)")
        layout = (f"{kind} {config.num_layers}+{config.num_decoder_layers} layers, d_model {config.d_model}, "
                  f"{config.num_heads} heads of {config.d_kv}, gated-GELU FFN {config.d_ff}")
    else:
        name = "LED" if preset.family == "led" else f"BART ({config.max_position_embeddings} positions)"
        layout = (f"{name} {config.encoder_layers}+{config.decoder_layers} layers, d_model {config.d_model}, "
                  f"{config.encoder_attention_heads} heads, FFN {config.encoder_ffn_dim}")
        if preset.family == "led":
            layout += f", attention window {preset.window}"
    return (f"{layout}, vocabulary {config.vocab_size}, {params / 1e6:.1f}M parameters, random init, "
            "same for every variant")


def variant_flops(config, lengths: dict, variant: str) -> float:
    """Model FLOPs of one epoch of a variant's rows, by lfqa's FLOPs model (lfqa.flops): a trains the first
    seed rows with global attention on token 0 only; b, c and d every row, global on the question."""
    from lfqa.flops import ModelShape, train_flops

    shape = ModelShape.from_config(config)
    inputs, answers, globals_ = (np.array(lengths[k]) for k in ("input", "answer", "global"))
    if variant == "a":
        n = int(lengths.get("seed_samples", len(inputs)))
        return train_flops(shape, inputs[:n], answers[:n], np.ones(n))
    return train_flops(shape, inputs, answers, globals_)


# --- the workers (one process per variant) --------------------------------------------------------------


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


class Turns:
    """A worker computes only in its turns: from the parent's "go" to the end of its next optimizer step.

    Shared machines are noisy (other jobs come and go within minutes), so the parent runs all variants at
    once and lets exactly one of them compute at a time, step by step in proportion to their lengths: load
    from outside then hits every variant alike, and each variant's time is the sum of its turns. Setup
    (imports, model, data) happens before the first turn and is not timed.
    """

    def __init__(self, cuda: bool):
        status_fd, go_fd = os.environ["LFQA_BENCH_TURNS"].split(",")
        self.status_fd, self.go_fd, self.cuda = int(status_fd), int(go_fd), cuda
        self.seconds, self.steps, self._go, self.started = 0.0, 0, 0.0, False

    def start(self) -> None:
        """Training is about to start: wait for the first turn (once)."""
        if self.started:
            return
        self.started = True
        from torch.optim.optimizer import register_optimizer_step_post_hook

        # Every optimizer step, whoever calls it (the Trainer, lfqa's loop, accelerate's wrapper), ends a turn.
        register_optimizer_step_post_hook(lambda *_: self.step_done())
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        os.write(self.status_fd, b"r")
        self._wait()

    def step_done(self) -> None:
        if self.cuda:
            import torch

            torch.cuda.synchronize()
        self.seconds += time.perf_counter() - self._go
        self.steps += 1
        os.write(self.status_fd, b"s")
        self._wait()

    def _wait(self) -> None:
        if not os.read(self.go_fd, 1):
            raise SystemExit("the benchmark's parent process went away")
        self._go = time.perf_counter()


class TokenCounter:
    """Wraps a collator: counts real and processed (as the model computes them) input and answer tokens."""

    def __init__(self, collate, window: int):
        self.collate, self.window = collate, window
        self.rows = self.batches = self.enc_real = self.enc_processed = self.dec_real = self.dec_processed = 0

    def __call__(self, rows):
        batch = self.collate(rows)
        n, width = batch["input_ids"].shape
        self.rows += n
        self.batches += 1
        self.enc_real += int(batch["attention_mask"].sum())
        # LED pads to its window inside; the other families compute the batch as it is (window 1)
        self.enc_processed += n * -(-width // self.window) * self.window
        self.dec_real += int((batch["labels"] != -100).sum())
        self.dec_processed += int(batch["labels"].numel())
        return batch


def seed_collator(pad_id: int, max_input: int, global_attention: bool):
    """The seed's batches: inputs padded to 8,192 (or the model's limit, BART's 1,024), labels to 512 (-100),
    global attention on token 0 (LED)."""
    import torch

    def collate(rows):
        n = len(rows)
        input_ids = torch.full((n, max_input), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((n, max_input), dtype=torch.long)
        labels = torch.full((n, SEED_MAX_ANSWER), -100, dtype=torch.long)
        for i, row in enumerate(rows):
            ids = row["input_ids"][:max_input]
            input_ids[i, :len(ids)] = torch.tensor(ids)
            attention_mask[i, :len(ids)] = 1
            labels[i, :len(row["labels"])] = torch.tensor(row["labels"][:SEED_MAX_ANSWER])
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        if global_attention:
            batch["global_attention_mask"] = torch.zeros_like(attention_mask)
            batch["global_attention_mask"][:, 0] = 1
        return batch

    return collate


def tuned_collator(tokenizer, model, pad_multiple: int | None, global_attention: bool):
    """DataCollatorForSeq2Seq (dynamic padding to the longest row) plus global attention on the question (LED).

    ``pad_multiple`` rounds inputs and, since transformers 5, labels up to a multiple (None: the longest row).
    """
    from transformers import DataCollatorForSeq2Seq

    base = DataCollatorForSeq2Seq(tokenizer, model=model, label_pad_token_id=-100, pad_to_multiple_of=pad_multiple)

    def collate(rows):
        batch = base([{"input_ids": r["input_ids"], "attention_mask": [1] * len(r["input_ids"]),
                       "labels": r["labels"]} for r in rows])
        if not global_attention:
            return batch
        global_attention_mask = batch["attention_mask"].new_zeros(batch["attention_mask"].shape)
        for i, row in enumerate(rows):
            global_attention_mask[i, :max(1, row["num_global"])] = 1
        batch["global_attention_mask"] = global_attention_mask
        return batch

    return collate


def run_trainer_variant(spec: dict, variant: str) -> dict:
    import datasets
    from transformers import (
        AutoModelForSeq2SeqLM,
        AutoTokenizer,
        Seq2SeqTrainer,
        Seq2SeqTrainingArguments,
        TrainerCallback,
    )

    baseline = rss_bytes()
    seed_recipe = variant == "a"
    data = datasets.load_from_disk(spec["tokenised"])
    if seed_recipe:
        data = data.select(range(spec["seed_samples"]))
    tokenizer = AutoTokenizer.from_pretrained(spec["model_dir"])
    model = AutoModelForSeq2SeqLM.from_pretrained(spec["model_dir"])
    model.accepts_loss_kwargs = False  # else the Trainer rescales LED's loss (DESIGN.md section 5)
    counter = TokenCounter(seed_collator(tokenizer.pad_token_id, spec["seed_max_input"], spec["global_attention"])
                           if seed_recipe else tuned_collator(tokenizer, model, spec["trainer_pad_multiple"],
                                                              spec["global_attention"]),
                           spec["window"])
    cuda = spec["device"] == "cuda"
    turns = Turns(cuda)

    class FirstTurn(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            turns.start()

    args = Seq2SeqTrainingArguments(
        output_dir=str(Path(spec["work"]) / f"trainer-{variant}"),
        per_device_train_batch_size=spec["trainer_batch_size"],
        num_train_epochs=1,
        learning_rate=spec["learning_rate"], weight_decay=spec["weight_decay"], max_grad_norm=1.0,
        warmup_steps=0, lr_scheduler_type="linear",
        activation_checkpointing=seed_recipe,
        train_sampling_strategy="random" if seed_recipe else "group_by_length",
        length_column_name="length",
        remove_unused_columns=False,  # the collator needs num_global
        bf16=spec["precision"] == "bf16",
        use_cpu=not cuda,
        dataloader_num_workers=0,
        logging_steps=10, save_strategy="no", eval_strategy="no", report_to="none", disable_tqdm=True,
        seed=spec["seed"],
    )
    trainer = Seq2SeqTrainer(model=model, args=args, train_dataset=data, data_collator=counter,
                             processing_class=tokenizer, callbacks=[FirstTurn()])
    output = trainer.train()
    return {
        "samples": counter.rows, "steps": turns.steps, "seconds": turns.seconds,
        "enc_real": counter.enc_real, "enc_processed": counter.enc_processed,
        "dec_real": counter.dec_real, "dec_processed": counter.dec_processed,
        "loss": output.training_loss, **memory(baseline, cuda),
    }


def run_lfqa_variant(spec: dict, variant: str = "c") -> dict:  # c, or d: c with ABLATION's settings
    """lfqa's real entry point, on a job file that points at the synthetic rows and the saved model."""
    import yaml

    from lfqa.config import load_job
    from lfqa.train import run

    baseline = rss_bytes()
    work = Path(spec["work"])
    run_dir = work / f"run-{variant}"
    job_file = work / f"job-{variant}.yaml"
    job = {
        "model": {"name_or_path": spec["model_dir"], "gradient_checkpointing": False},
        "data": {"train_files": [spec["train_file"]], "validation_files": [spec["validation_file"]],
                 "max_answer_tokens": MAX_ANSWER_TOKENS, "max_input_tokens": spec["max_input"],
                 "global_attention": "question",
                 "batch_size": spec["max_batch_size"], "max_tokens_per_batch": spec["max_tokens"],
                 "group_by_length": True, "cache_dir": str(work / "cache")},
        "train": {"seed": spec["seed"], "epochs": 1, "learning_rate": spec["learning_rate"],
                  "weight_decay": spec["weight_decay"], "warmup_steps": 0, "max_grad_norm": 1.0,
                  "precision": spec["precision"]},
        # The end-of-run evaluation (outside the timed loop) on 2 rows, no generation.
        "eval": {"at_start": False, "every_steps": 0, "batch_size": 2, "max_generate_samples": 0,
                 "num_examples_to_print": 0},
        "output": {"dir": str(run_dir)},
        "checkpoint": {"resume": "never"},
        # One log record, at the last step: lfqa's token counts and padding efficiencies over the whole epoch.
        "tracking": {"log_every_steps": 1_000_000, "progress_bar": False, "wandb": {"mode": "disabled"}},
    }
    if variant == "d":
        for section, values in ABLATION.items():
            job[section].update(values)
    job_file.write_text(yaml.safe_dump(job, sort_keys=False))
    job = load_job(job_file)
    turns = Turns(spec["device"] == "cuda")
    summary = run(job, callbacks=[TurnsStart(turns)])
    last = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
            if "train/samples_per_s" in line][-1]
    samples = int(summary["ranks"]["rows_seen_per_rank_epoch0"][0])
    # lfqa's own rates count the other variants' turns too; its token counts are exact. One epoch: every row
    # once, so lfqa must have counted the rows' real tokens (a check that c trained on all of them).
    real = last["train/tokens_per_s"] * samples / last["train/samples_per_s"]
    lengths = json.loads((work / "lengths.json").read_text())
    enc_real, dec_real = int(sum(lengths["input"])), int(sum(lengths["answer"]))
    if abs(enc_real + dec_real - real) > 1e-6 * real + 1:
        raise RuntimeError(f"lfqa counted {real:.0f} real tokens, the rows hold {enc_real + dec_real}")
    # The same FLOPs model in lfqa's log and in this table: c's logged model FLOPs are those of its rows.
    logged = last["train/model_flops_per_s"] * samples / last["train/samples_per_s"]
    from transformers import AutoConfig

    expected = variant_flops(AutoConfig.from_pretrained(spec["model_dir"]), lengths, variant)
    if abs(logged - expected) > 1e-6 * expected:
        raise RuntimeError(f"lfqa logged {logged:.4g} model FLOPs, the FLOPs model gives {expected:.4g}")
    return {
        "samples": samples, "steps": turns.steps, "seconds": turns.seconds,
        "enc_real": enc_real, "enc_processed": enc_real / last["train/input_padding_efficiency"],
        "dec_real": dec_real, "dec_processed": dec_real / last["train/answer_padding_efficiency"],
        "loss": last["train/loss"],
        **memory(baseline, spec["device"] == "cuda"),
    }


class TurnsStart:
    """A callback of lfqa's loop (lfqa.trainer.Callbacks): c's first turn starts when training starts."""

    def __init__(self, turns: Turns):
        self.turns = turns

    def on_fit_start(self, trainer) -> None:
        self.turns.start()


def memory(baseline: int, cuda: bool) -> dict:
    out = {"peak_rss": peak_rss_bytes(), "rss_baseline": baseline}
    if cuda:
        import torch

        out["peak_gpu"] = torch.cuda.max_memory_allocated()
    return out


def worker_main(variant: str, work: Path) -> None:
    spec = json.loads((work / "spec.json").read_text())
    result = run_lfqa_variant(spec, variant) if variant in "cd" else run_trainer_variant(spec, variant)
    (work / f"result-{variant}.json").write_text(json.dumps(result, indent=1))


# --- the parent: prepare, run, report -------------------------------------------------------------------


def prepare(args, preset: Preset, work: Path) -> dict:
    """Model, rows and the tokenised rows (through lfqa's own tokenisation, shared by every variant)."""
    from lfqa.config import DataConfig
    from lfqa.data import read_files, tokenize_examples
    from lfqa.modeling import load_tokenizer

    built = build_model(preset, work, args.seed)
    model_dir, limit = built.model_dir, built.input_limit
    tokenizer = load_tokenizer(str(model_dir))
    train_file, validation_file = work / "train.jsonl", work / "validation.jsonl"
    write_jsonl(train_file, synthetic_rows(args.samples, args.seed, tokenizer))
    write_jsonl(validation_file, synthetic_rows(2, args.seed + 1, tokenizer))
    # The same settings as c's job, so that c then loads these rows from the cache.
    cfg = DataConfig(train_files=[str(train_file)], validation_files=[str(validation_file)],
                     cache_dir=str(work / "cache"), max_answer_tokens=MAX_ANSWER_TOKENS, max_input_tokens=limit)
    examples, report, fingerprint = read_files(cfg.train_files, cfg.fields)
    tokenised = tokenize_examples(examples, tokenizer, cfg, report, fingerprint, max_input_tokens=limit,
                                  max_answer_tokens=MAX_ANSWER_TOKENS, limit=None, log=lambda _: None)
    if len(tokenised) != args.samples:
        raise RuntimeError(f"{args.samples - len(tokenised)} synthetic rows were dropped by the answer filter")
    inputs, answers = list(tokenised["input_length"]), list(tokenised["label_length"])
    tokenised = tokenised.add_column("length", inputs)  # what the Trainer's group_by_length reads
    tokenised.save_to_disk(str(work / "tokenised"))
    globals_ = [max(1, int(g)) for g in tokenised["num_global"]]  # the collator marks at least one token
    (work / "lengths.json").write_text(json.dumps({"input": inputs, "answer": answers, "global": globals_,
                                                   "seed_samples": min(args.seed_samples, args.samples)}))
    max_tokens = args.max_tokens or preset.max_tokens_per_batch
    spec = {
        "work": str(work), "model_dir": str(model_dir), "tokenised": str(work / "tokenised"),
        "train_file": str(train_file), "validation_file": str(validation_file),
        "seed": args.seed, "seed_samples": min(args.seed_samples, args.samples),
        "window": built.window, "pad_multiple": built.pad_multiple, "global_attention": built.global_attention,
        "max_input": limit, "seed_max_input": min(SEED_MAX_INPUT, limit),
        "device": args.device, "precision": args.precision,
        "trainer_batch_size": args.trainer_batch_size, "trainer_pad_multiple": args.trainer_pad_multiple,
        "max_tokens": max_tokens, "max_batch_size": args.max_batch_size or preset.max_batch_size,
        "learning_rate": 5e-5, "weight_decay": 0.01, "params": built.params,
    }
    (work / "spec.json").write_text(json.dumps(spec, indent=1))
    return spec


class Worker:
    """One variant's process and the two pipes of its turns (see :class:`Turns`)."""

    def __init__(self, variant: str, work: Path, device: str, expected_steps: int):
        self.variant, self.work, self.expected_steps, self.steps = variant, work, expected_steps, 0
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("ACCELERATE_", "WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_"))}
        env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
                   WANDB_MODE="disabled", PYTHONUNBUFFERED="1",
                   PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])))
        if device == "cpu":
            env["CUDA_VISIBLE_DEVICES"] = ""
        status_r, status_w = os.pipe()
        go_r, go_w = os.pipe()
        env["LFQA_BENCH_TURNS"] = f"{status_w},{go_r}"
        self.log = work / f"log-{variant}.txt"
        self.started = time.perf_counter()
        with self.log.open("w") as f:
            self.proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--worker", variant,
                                          "--work-dir", str(work)], stdout=f, stderr=subprocess.STDOUT, env=env,
                                         cwd=ROOT, pass_fds=(status_w, go_r))
        os.close(status_w)
        os.close(go_r)
        self.status, self.go = status_r, go_w

    def wait_ready(self) -> None:
        if os.read(self.status, 1) != b"r":
            self.fail()

    def turn(self) -> bool:
        """Let the worker run one step (or finish); False once it has exited."""
        os.write(self.go, b"g")
        message = os.read(self.status, 1)
        if message == b"s":
            self.steps += 1
            return True
        if message:
            self.fail()
        return False

    def result(self) -> dict:
        if self.proc.wait() != 0:
            self.fail()
        os.close(self.status)
        os.close(self.go)
        result = json.loads((self.work / f"result-{self.variant}.json").read_text())
        result["wall_seconds"] = time.perf_counter() - self.started
        return result

    def fail(self) -> None:
        code = self.proc.wait()
        tail = "\n".join(self.log.read_text().splitlines()[-30:])
        raise SystemExit(f"variant {self.variant} failed (exit {code}); end of {self.log}:\n{tail}")


def run_variants(variants: list[str], work: Path, device: str, expected: dict[str, int],
                 sequential: bool) -> dict[str, dict]:
    """Run the variants' workers, one step at a time (interleaved) or one after the other."""
    results: dict[str, dict] = {}
    groups = [[v] for v in variants] if sequential else [variants]
    for group in groups:
        workers = [Worker(v, work, device, expected[v]) for v in group]
        try:
            for w in workers:
                w.wait_ready()
            active = list(workers)
            last_report = time.perf_counter()
            while active:
                # Stride scheduling: the variant furthest behind (as a fraction of its steps) goes next, so that
                # every variant's steps are spread over the whole run.
                w = min(active, key=lambda w: (w.steps + 1) / w.expected_steps)
                if time.perf_counter() - last_report > 60:
                    print("  steps: " + ", ".join(f"{x.variant} {x.steps}/{x.expected_steps}" for x in workers),
                          flush=True)
                    last_report = time.perf_counter()
                if not w.turn():
                    active.remove(w)
                    results[w.variant] = w.result()
                    r = results[w.variant]
                    print(f"{w.variant}: {r['samples'] / r['seconds']:.3f} samples/s, {r['steps']} steps, "
                          f"{r['seconds']:.1f} s of training", flush=True)
        finally:
            for w in workers:
                if w.proc.poll() is None:
                    w.proc.kill()
    return {v: results[v] for v in variants}


def expected_steps(spec: dict, variants: list[str]) -> dict[str, int]:
    """Optimizer steps each variant will take (for the scheduler; a wrong guess only skews the interleaving)."""
    from lfqa.data import LengthGroupedBatchSampler

    lengths = json.loads((Path(spec["work"]) / "lengths.json").read_text())
    out = {"a": -(-spec["seed_samples"] // spec["trainer_batch_size"]),
           "b": -(-len(lengths["input"]) // spec["trainer_batch_size"])}
    out["c"] = out["d"] = len(LengthGroupedBatchSampler(lengths["input"], lengths["answer"], spec["max_batch_size"],
                                             window=spec["window"], seed=spec["seed"],
                                             max_tokens=spec["max_tokens"]))
    return {v: max(1, out[v]) for v in variants}


def machine_line(device: str) -> str:
    import torch

    cpu = "unknown CPU"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    line = f"{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, torch {torch.__version__}"
    if device == "cuda" and torch.cuda.is_available():
        line = f"{torch.cuda.get_device_name(0)}; host: {line}"
    elif not torch.cuda.is_available():
        line += ", no GPU"
    return line


def load_line() -> str:
    try:
        return "load average " + ", ".join(f"{x:.2f}" for x in os.getloadavg()) + " (1, 5, 15 min)"
    except OSError:
        return "load average unknown"


def peak_flops(args) -> tuple[float, str]:
    """(FLOP/s, where it comes from): --peak-tflops, a known GPU's data sheet, else the GEMM probe, measured
    once by the parent before the variants start (the same figure for every variant of the run)."""
    if args.peak_tflops:
        return args.peak_tflops * 1e12, "--peak-tflops"
    from lfqa.flops import peak_flops as device_peak

    peak = device_peak(args.device, args.precision)
    return peak.flops_per_s, peak.source


def render(args, preset: Preset, spec: dict, results: dict, context: dict) -> str:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(spec["model_dir"])
    lengths = json.loads((Path(spec["work"]) / "lengths.json").read_text())
    inputs, answers = np.array(lengths["input"]), np.array(lengths["answer"])
    multiple = spec["pad_multiple"]
    bound = inputs.sum() / (-(-inputs // multiple) * multiple).sum()
    padding = (f"padding inputs to the {multiple}-token window alone" if preset.family == "led"
               else f"padding inputs to a multiple of {multiple} (lfqa's collator)")
    cut = "" if spec["max_input"] >= 16384 else f"; inputs cut to the model's {spec['max_input']:,} positions"
    peak, peak_source = context["peak"]
    cuda = args.device == "cuda"
    header = ["variant", "rows", "optimizer steps", "rows/step", "samples/s", "real tokens/s",
              "encoder padding eff.", "decoder padding eff.", "peak GPU memory" if cuda else "peak RSS (+ over start)",
              "model TFLOP/s", "MFU"]
    lines = [f"# Training throughput: seed recipe vs tuned Trainer vs lfqa ({args.device}, {args.precision}, "
             f"preset {args.preset})", "",
             f"- date: {context['date']}; command: `{context['command']}`",
             f"- machine: {context['machine']}; {context['load_before']} before, {context['load_after']} after",
             f"- model: {describe_model(preset, config, spec['params'])} (seed {args.seed})",
             f"- data: {len(inputs)} synthetic rows; input tokens mean {inputs.mean():.0f} (median "
             f"{np.median(inputs):.0f}, 90th percentile {np.percentile(inputs, 90):.0f}, max {inputs.max()}); answer "
             f"tokens mean {answers.mean():.0f} (max {answers.max()}){cut}; {padding} caps encoder efficiency "
             f"at {bound:.3f}",
             f"- optimizer: AdamW lr 5e-5, weight decay 0.01, clip 1.0, linear decay, no warm-up; a and b: batch "
             f"{spec['trainer_batch_size']}; c: token budget {spec['max_tokens']} (at most {spec['max_batch_size']} "
             f"rows per batch)",
             f"- peak for MFU: {peak / 1e12:.3g} TFLOP/s ({peak_source})",
             "", "| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for variant, r in results.items():
        real = r["enc_real"] + r["dec_real"]
        flops = variant_flops(config, lengths, variant) / r["seconds"]
        if cuda:
            mem = _gib(r["peak_gpu"])
        else:
            mem = f"{_gib(r['peak_rss'])} (+{_gib(r['peak_rss'] - r['rss_baseline'])})"
        row = [f"{variant}: {variant_label(variant, spec)}", str(r["samples"]), str(r["steps"]),
               f"{r['samples'] / r['steps']:.2f}", f"{r['samples'] / r['seconds']:.3f}", f"{real / r['seconds']:.0f}",
               f"{r['enc_real'] / r['enc_processed']:.3f}", f"{r['dec_real'] / r['dec_processed']:.3f}", mem,
               f"{flops / 1e12:.3f}", f"{flops / peak:.1%}"]
        lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    for num, den in (("c", "a"), ("c", "b"), ("b", "a"), ("c", "d"), ("d", "b")):
        if num in results and den in results:
            rn, rd = results[num], results[den]
            ratio = (rn["samples"] / rn["seconds"]) / (rd["samples"] / rd["seconds"])
            tok = (((rn["enc_real"] + rn["dec_real"]) / rn["seconds"])
                   / ((rd["enc_real"] + rd["dec_real"]) / rd["seconds"]))
            lines.append(f"- **{num}/{den}: {ratio:.2f}x** samples/s ({tok:.2f}x real tokens/s)")
    lines += ["",
              "samples/s and real tokens/s: rows and their unpadded input + answer tokens per second of training "
              "(every step, the first included; start-up and evaluation excluded). The variants ran at the same "
              "time but took turns, one optimizer step at a time, so that other load on the machine hit them "
              "alike (--sequential: one after the other). Padding efficiency: real / processed tokens, where "
              "processed inputs are padded to the attention window as LED computes them (the other families: as "
              "batched). Peak RSS: the worker "
              "process's high-water mark (+ over its size after imports, before the model was loaded). "
              "Model TFLOP/s: training FLOPs of the real tokens (3 x forward, no recomputation; lfqa.flops, the "
              "model lfqa's train/mfu uses) per second; MFU: over the peak above (on CPU: this machine's dense "
              "matmul rate at this precision, measured in this run)."]
    return "\n".join(lines) + "\n"


def variant_label(variant: str, spec: dict) -> str:
    """VARIANTS' line as it applies to the model: the seed pads to what the model takes (BART: 1,024), and
    only LED has lfqa's attention to ablate."""
    label = VARIANTS[variant]
    if variant == "a":
        label = label.replace(str(SEED_MAX_INPUT), str(spec["seed_max_input"]))
    if variant == "d" and not spec["global_attention"]:
        label = "c without lfqa's speed-ups: for-loop AdamW, glibc returns freed memory (no LED attention here)"
    return label


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.worker:
        worker_main(args.worker, args.work_dir)
        return 0
    variants = [v for v in args.variants if v in VARIANTS]
    if not variants or len(variants) != len(args.variants):
        raise SystemExit(f"--variants: letters from {''.join(VARIANTS)}, got {args.variants!r}")
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: no CUDA device is visible")
    preset = PRESETS[args.preset]
    date = dt.date.today().isoformat()
    out = args.out
    if out is None:  # a new file per run: never overwrite an earlier run (or the notes added to it)
        out = ROOT / "benchmarks" / "results" / f"{args.device}-{date}.md"
        n = 2
        while out.exists():
            out, n = out.with_name(f"{args.device}-{date}-{n}.md"), n + 1
    context = {"date": date, "command": " ".join(["python benchmarks/run.py", *(argv or sys.argv[1:])]),
               "machine": machine_line(args.device), "load_before": load_line(), "peak": peak_flops(args)}
    with tempfile.TemporaryDirectory(prefix="lfqa-bench-") as tmp:
        work = (args.work_dir or Path(tmp)).resolve()
        work.mkdir(parents=True, exist_ok=True)
        print(f"preparing the {args.preset} {preset.family} model and {args.samples} synthetic rows in {work}",
              flush=True)
        spec = prepare(args, preset, work)
        for variant in variants:
            rows = spec["seed_samples"] if variant == "a" else args.samples
            print(f"{variant}: {variant_label(variant, spec)} ({rows} rows)", flush=True)
        print("running " + ("one after the other" if args.sequential else "interleaved, one step at a time"),
              flush=True)
        results = run_variants(variants, work, args.device, expected_steps(spec, variants), args.sequential)
        context["load_after"] = load_line()
        table = render(args, preset, spec, results, context)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(table)
    print()
    print(table)
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
