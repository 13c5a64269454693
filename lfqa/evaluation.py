"""Evaluation during training: validation loss, and fact recall and ``eval.metrics`` (ROUGE...) on generated
answers, split between ranks."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from accelerate.utils import gather_object

from lfqa.config import EvalConfig, GenerationConfig
from lfqa.data import Seq2SeqCollator
from lfqa.evaluator import EvalData
from lfqa.metrics import compute_metrics

BOOTSTRAP_SAMPLES = 1000


@dataclass
class EvalResult:
    loss: float
    rouge: dict[str, float]
    samples: list[dict] = field(default_factory=list)
    """Question / generated / reference triples, in validation order."""
    num_loss_examples: int = 0
    num_generated: int = 0
    other: dict[str, float] = field(default_factory=dict)
    """The numbers of every metric of ``eval.metrics`` but ROUGE, as ``metric/key``."""
    facts: dict[str, float] = field(default_factory=dict)
    """fact_recall, its interval and fact_rows, when the generated rows have facts."""

    def metrics(self, prefix: str = "eval/") -> dict[str, float]:
        numbers = {**self.rouge, **self.other, **self.facts}
        return {f"{prefix}loss": self.loss, **{f"{prefix}{k}": v for k, v in numbers.items()}}


def generation_kwargs(gen: GenerationConfig) -> dict:
    # decoder_start_token_id is left to the model's generation_config, which lfqa.modeling keeps equal
    # to the token training used.
    from lfqa.modeling import generation_settings

    return generation_settings(gen)


def _rank_batches(shares: list[list[int]], rank: int, size: int, lockstep: bool) -> list[tuple[list[int], bool]]:
    """This rank's batches as (indices, real); in lockstep every rank runs as many batches as the busiest.

    Under ZeRO-3 each forward gathers parameters from every rank, so all ranks must run the same number of
    forwards: a rank with fewer rows repeats a batch whose result it throws away (``real`` False).
    """
    mine = [shares[rank][i:i + size] for i in range(0, len(shares[rank]), size)]
    out = [(idx, True) for idx in mine]
    if lockstep:
        most = max(math.ceil(len(share) / size) for share in shares)
        filler = mine[-1] if mine else [next(i for share in shares for i in share)]
        out += [(filler, False)] * (most - len(mine))
    return out


@dataclass
class RankShares:
    """Which validation rows each rank evaluates: round-robin over the rows sorted by length (little padding)."""

    shares: list[list[int]]
    rank: int
    zero3: bool
    """Under ZeRO-3 every forward gathers parameters from all ranks: they run in lockstep."""

    @classmethod
    def of(cls, dataset, accelerator) -> RankShares:
        plugin = accelerator.state.deepspeed_plugin
        lengths = list(dataset["input_length"])
        by_length = sorted(range(len(dataset)), key=lambda i: lengths[i])
        world = accelerator.num_processes
        return cls([by_length[r::world] for r in range(world)], accelerator.process_index,
                   plugin is not None and plugin.zero_stage == 3)


@torch.no_grad()
def evaluate(model, tokenizer, data: EvalData, cfg: EvalConfig, accelerator, collator: Seq2SeqCollator,
             generate: bool = True) -> EvalResult:
    """Loss on every validation row, generated answers for the first ``max_generate_samples`` (unless not
    ``generate``) and their scores.

    The sums and the generated texts are gathered, so every rank returns the same result. Under ZeRO-3 the
    ranks run in lockstep and generate with ``synced_gpus`` (answers of different lengths would hang).
    """
    dataset = data.dataset
    # The unwrapped module: a DDP forward may broadcast buffers, a collective that would hang when the
    # ranks run different numbers of batches (len(dataset) not divisible by the world size).
    unwrapped = accelerator.unwrap_model(model)
    ranks = RankShares.of(dataset, accelerator)
    model.eval()
    try:
        loss = _validation_loss(unwrapped, dataset, ranks, cfg.batch_size, accelerator, collator)
        if not generate:
            return EvalResult(loss=loss, rouge={}, num_loss_examples=len(dataset))
        predictions = _generated_answers(unwrapped, tokenizer, dataset, ranks, cfg, accelerator, collator)
    finally:
        model.train()
    preds = [p for _, p in predictions]
    refs = [data.references[i] for i, _ in predictions]
    samples = [{"question": data.questions[i], "generated": p, "reference": data.references[i]}
               for i, p in predictions]
    facts = [data.facts[i] for i, _ in predictions] if data.facts is not None else None
    # Intervals for every mean: resampling the per-row scores costs milliseconds.
    scores = compute_metrics(cfg.metrics, preds, refs, facts=facts, bootstrap=BOOTSTRAP_SAMPLES)
    return EvalResult(loss=loss, rouge=scores.rouge, samples=samples, num_loss_examples=len(dataset),
                      num_generated=len(preds), other=scores.other, facts=scores.facts)


def _validation_loss(model, dataset, ranks: RankShares, batch_size: int, accelerator, collator) -> float:
    """The token-weighted loss over every row, summed over the ranks."""
    loss_sum = torch.zeros((), dtype=torch.float64, device=accelerator.device)
    token_count = torch.zeros((), dtype=torch.float64, device=accelerator.device)
    for idx, real in _rank_batches(ranks.shares, ranks.rank, batch_size, ranks.zero3):
        batch = {k: v.to(accelerator.device) for k, v in collator([dataset[i] for i in idx]).items()}
        with accelerator.autocast():
            out = model(**batch)
        if real:
            n_tokens = (batch["labels"] != -100).sum()
            loss_sum += out.loss.double() * n_tokens
            token_count += n_tokens
    loss_sum = accelerator.reduce(loss_sum, reduction="sum")
    token_count = accelerator.reduce(token_count, reduction="sum")
    return float(loss_sum / token_count) if token_count > 0 else math.nan


def _generated_answers(model, tokenizer, dataset, ranks: RankShares, cfg: EvalConfig, accelerator,
                       collator) -> list[tuple[int, str]]:
    """(row, answer) for the first ``cfg.max_generate_samples`` rows, from every rank, in row order."""
    limit = len(dataset) if cfg.max_generate_samples is None else min(cfg.max_generate_samples, len(dataset))
    shares = [[i for i in share if i < limit] for share in ranks.shares]
    predictions: list[tuple[int, str]] = []
    kwargs = generation_kwargs(cfg.generation)
    if ranks.zero3:
        kwargs["synced_gpus"] = True
    for idx, real in _rank_batches(shares, ranks.rank, cfg.batch_size, ranks.zero3 and limit > 0):
        batch = collator([dataset[i] for i in idx])
        with accelerator.autocast():
            # LED's global_attention_mask only where the collator made one: other families refuse the key.
            inputs = {k: v.to(accelerator.device) for k, v in batch.items()
                      if k in ("input_ids", "attention_mask", "global_attention_mask")}
            generated = model.generate(**inputs, **kwargs)
        if real:
            texts = tokenizer.batch_decode(generated, skip_special_tokens=True)
            predictions.extend(zip(idx, (t.strip() for t in texts)))
    if accelerator.num_processes > 1:
        predictions = gather_object(predictions)
    return sorted(predictions)
