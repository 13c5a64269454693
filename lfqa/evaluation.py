"""Evaluation during training: validation loss and ``eval.metrics`` (ROUGE...) on generated answers, split between
ranks."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from accelerate.utils import gather_object

from lfqa.config import EvalConfig, GenerationConfig
from lfqa.data import Seq2SeqCollator
from lfqa.metrics import compute_metrics


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

    def metrics(self, prefix: str = "eval/") -> dict[str, float]:
        return {f"{prefix}loss": self.loss, **{f"{prefix}{k}": v for k, v in {**self.rouge, **self.other}.items()}}


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


@torch.no_grad()
def evaluate(model, tokenizer, dataset, questions: list[str], references: list[str], cfg: EvalConfig,
             accelerator, collator: Seq2SeqCollator) -> EvalResult:
    """Loss on every validation row, generated answers for the first ``max_generate_samples``.

    Rows are dealt out round-robin to the ranks (sorted by length first, so batches pad little); the
    sums and the generated texts are gathered, so every rank returns the same result. Under ZeRO-3 the
    ranks run in lockstep and generate with ``synced_gpus`` (answers of different lengths would hang).
    """
    model.eval()
    unwrapped = accelerator.unwrap_model(model)
    rank, world = accelerator.process_index, accelerator.num_processes
    plugin = accelerator.state.deepspeed_plugin
    zero3 = plugin is not None and plugin.zero_stage == 3
    lengths = list(dataset["input_length"])
    by_length = sorted(range(len(dataset)), key=lambda i: lengths[i])
    shares = [by_length[r::world] for r in range(world)]

    loss_sum = torch.zeros((), dtype=torch.float64, device=accelerator.device)
    token_count = torch.zeros((), dtype=torch.float64, device=accelerator.device)
    for idx, real in _rank_batches(shares, rank, cfg.batch_size, zero3):
        batch = {k: v.to(accelerator.device) for k, v in collator([dataset[i] for i in idx]).items()}
        # The unwrapped module: a DDP forward may broadcast buffers, a collective that would hang when the
        # ranks run different numbers of batches (len(dataset) not divisible by the world size).
        with accelerator.autocast():
            out = unwrapped(**batch)
        if real:
            n_tokens = (batch["labels"] != -100).sum()
            loss_sum += out.loss.double() * n_tokens
            token_count += n_tokens
    loss_sum = accelerator.reduce(loss_sum, reduction="sum")
    token_count = accelerator.reduce(token_count, reduction="sum")
    loss = float(loss_sum / token_count) if token_count > 0 else math.nan

    limit = len(dataset) if cfg.max_generate_samples is None else min(cfg.max_generate_samples, len(dataset))
    gen_shares = [[i for i in share if i < limit] for share in shares]
    predictions: list[tuple[int, str]] = []
    kwargs = generation_kwargs(cfg.generation)
    if zero3:
        kwargs["synced_gpus"] = True
    for idx, real in _rank_batches(gen_shares, rank, cfg.batch_size, zero3 and limit > 0):
        batch = collator([dataset[i] for i in idx])
        with accelerator.autocast():
            # LED's global_attention_mask only where the collator made one: other families refuse the key.
            inputs = {k: v.to(accelerator.device) for k, v in batch.items()
                      if k in ("input_ids", "attention_mask", "global_attention_mask")}
            generated = unwrapped.generate(**inputs, **kwargs)
        if real:
            texts = tokenizer.batch_decode(generated, skip_special_tokens=True)
            predictions.extend(zip(idx, (t.strip() for t in texts)))
    if world > 1:
        predictions = gather_object(predictions)
    predictions.sort()
    preds = [p for _, p in predictions]
    refs = [references[i] for i, _ in predictions]
    samples = [{"question": questions[i], "generated": p, "reference": references[i]} for i, p in predictions]
    model.train()
    scores = compute_metrics(cfg.metrics, preds, refs)
    return EvalResult(loss=loss, rouge=scores.rouge, samples=samples, num_loss_examples=len(dataset),
                      num_generated=len(preds), other=scores.other)
