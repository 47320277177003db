"""Which positions an evaluation gates: as the model runs for a user (``deployed``), or all (``all-tokens``).

Activation sparsity saves bytes only when decoding one token at a time; a prompt is one compute-bound
forward, where skipping weight columns saves nothing, so the runtime runs prompts dense and gates the
generated tokens (``load(..., gate_prefill=False)``). Scores measured with every token gated (the WINA
and TEAL papers' protocol, ``all-tokens``) are then pessimistic for the user: the prompt's keys and
values are exact in deployment. ``deployed`` gates only what a generation would gate:

* perplexity: each window's first ``prompt`` tokens are the prompt (dense, not scored), the rest is
  scored with every position gated: the loss of generating the window's rest given its start;
* log-likelihood tasks: an item's context is dense, its continuation tokens are gated (the first
  continuation token is predicted by the context's last position, dense, as a prefill predicts it);
* generation (GSM8K): the prompt dense, every generated token gated (what ``gate_prefill=False`` does).

One forward with a ``[batch, positions]`` gate mask (``GateContext.gating``) computes what a dense prefill
followed by gated one-token decode steps computes (attention is causal; tests/test_protocol.py checks it
against a real step-by-step decode with the KV cache).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from ..errors import WinaError

DEPLOYED = "deployed"
ALL_TOKENS = "all-tokens"
PROTOCOLS = (DEPLOYED, ALL_TOKENS)


def check_protocol(protocol: str) -> str:
    if protocol not in PROTOCOLS:
        raise WinaError(f"unknown protocol {protocol!r}: choose {' or '.join(PROTOCOLS)}")
    return protocol


def decode_positions(shape: torch.Size | tuple[int, int], prompt: int, device: Any = None) -> torch.Tensor:
    """``[batch, positions]`` bool: True from position ``prompt`` on (the tokens a generation decodes one by one)."""
    batch, positions = shape
    return (torch.arange(positions, device=device) >= prompt).expand(batch, positions)


def continuation_positions(rows: torch.Tensor, gated_tails: Sequence[int], lengths: Sequence[int]) -> torch.Tensor:
    """``[batch, positions]`` bool for a batch of right-padded inputs: row ``i`` gates its last ``gated_tails[i]``
    real positions (of ``lengths[i]``); the padding after them is not gated."""
    mask = torch.zeros(rows.shape, dtype=torch.bool, device=rows.device)
    for i, (tail, length) in enumerate(zip(gated_tails, lengths)):
        if tail > 0:
            mask[i, length - tail : length] = True
    return mask


def deployed_lm_class() -> type:
    """lm-eval's ``HFLM`` that scores log-likelihood requests as deployed: context dense, continuation gated.

    lm-eval feeds ``(context + continuation)[:-1]`` (left-truncated to the model's length) and reads the
    continuation's log-probabilities off the last positions; of those inputs, the continuation tokens but the
    last are the ones a generation would decode. The rows of a batch are matched to their requests by their
    tokens (right padding stripped).
    """
    from lm_eval.models.huggingface import HFLM

    class DeployedHFLM(HFLM):
        def _loglikelihood_tokens(self, requests, disable_tqdm=False, override_bs=None):
            tails: dict[tuple[int, ...], int] = {}
            for _, context, continuation in requests:
                fed = tuple((context + continuation)[-(self.max_length + 1):][:-1])
                tails.setdefault(fed, min(len(continuation) - 1, len(fed)))
            self._tails = tails
            self._lengths = sorted({len(k) for k in tails}, reverse=True)
            try:
                return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm, override_bs=override_bs)
            finally:
                self._tails, self._lengths = {}, []

        def _model_call(self, inps, attn_mask=None, labels=None):
            tails = getattr(self, "_tails", None)
            if not tails or attn_mask is not None:  # generation's own forwards, or a seq2seq call: the runtime's rule
                return super()._model_call(inps, attn_mask=attn_mask, labels=labels)
            gated, lengths = [], []
            for row in inps.tolist():
                length, tail = _match(row, tails, self._lengths)
                gated.append(tail)
                lengths.append(length)
            with self.model.wina.context.gating(continuation_positions(inps, gated, lengths)):
                return super()._model_call(inps)

    return DeployedHFLM


def _match(row: list[int], tails: dict[tuple[int, ...], int], lengths: list[int]) -> tuple[int, int]:
    """(real length, gated tail) of a right-padded input row: its longest prefix that is a request's input,
    with only padding (zeros) after it."""
    for length in lengths:
        if length <= len(row) and not any(row[length:]) and tuple(row[:length]) in tails:
            return length, tails[tuple(row[:length])]
    raise WinaError("deployed protocol: an lm-eval input matches none of its requests (an lm-eval version this "
                    "runner was not written for?); use --protocol all-tokens")
