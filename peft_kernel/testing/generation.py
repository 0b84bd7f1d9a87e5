"""Exact generation: the contract every prompt-learning method runs against itself.

``generate()`` reuses a key/value cache from step to step. Whatever a method does to the
model (virtual tokens in front of the input, per-layer prefixes, gated attention), the
logits of every generated step must equal those of a *full forward over the same prefix
without any cache* — the ground truth, which needs no oracle. HF PEFT's own ``generate`` is
not used as the reference here (0.21.2 on transformers 5.25 is off by up to 0.28).

Subclass :class:`GenerationConformance` in the plugin's tests::

    from peft_kernel.testing.generation import GenerationConformance

    class TestMyPromptMethodGeneration(GenerationConformance):
        causal_lm_fn = staticmethod(make_tiny_llama)        # any transformers causal LM
        seq2seq_lm_fn = staticmethod(make_tiny_t5)          # or None
        config_fn = staticmethod(lambda task_type: MyConfig(task_type=task_type, num_virtual_tokens=4))

Every test compares, step by step, the logits ``generate(..., output_logits=True)`` reports
with a full forward of the adapted model over the prefix generated so far:

* decoder-only models: dynamic cache, static cache, a left-padded batch (with both caches;
  the truth is the forward over the row without its padding, as the base model's
  ``generate`` treats padding), beam search (each returned beam's token scores against the
  full forward's log-probabilities), and ``use_cache=False``;
* a decoder-only prompt given as ``inputs_embeds``;
* encoder-decoder models: the same cache types and beam search; the encoder input is the
  same (padded, masked) input in both, the decoder prefix grows.

:func:`generation_gap` does one such comparison and returns the worst difference; use it
directly to report numbers, or set ``PEFT_KERNEL_GENERATION_REPORT=<file>`` while running the
tests: each check appends ``{"test", "mode", "gap"}`` to that file as a JSON line.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .conformance import perturb

#: tolerance of the step-by-step comparison (fp32)
ATOL = 1e-4

#: ``(name, generate kwargs, left-padded?)`` for decoder-only models
CAUSAL_MODES = [
    ("dynamic", {}, False),
    ("static", {"cache_implementation": "static"}, False),
    ("padded-dynamic", {}, True),
    ("padded-static", {"cache_implementation": "static"}, True),
    ("beam", {"num_beams": 3, "num_return_sequences": 3}, False),
    ("padded-beam", {"num_beams": 2}, True),
    ("no-cache", {"use_cache": False}, False),
]
#: the same for encoder-decoder models
SEQ2SEQ_MODES = [
    ("dynamic", {}, False),
    ("static", {"cache_implementation": "static"}, False),
    ("padded-dynamic", {}, True),
    ("beam", {"num_beams": 3, "num_return_sequences": 2}, False),
    ("no-cache", {"use_cache": False}, False),
]


def _inputs(vocab: int, padded: bool, batch: int = 2, length: int = 6) -> tuple[torch.Tensor, torch.Tensor | None]:
    ids = torch.randint(3, vocab, (batch, length), generator=torch.Generator().manual_seed(0))
    if not padded:
        return ids, None
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[0, :2] = 0  # row 0 is left-padded by two tokens
    return ids, mask


def _full_logits(model: nn.Module, encoder_decoder: bool, enc_ids, enc_mask, dec_ids, row_inputs) -> torch.Tensor:
    """Logits of the last position of a full forward over one row's prefix, no cache."""
    with torch.no_grad():
        if encoder_decoder:
            out = model(input_ids=enc_ids[None], attention_mask=None if enc_mask is None else enc_mask[None],
                        decoder_input_ids=dec_ids[None], use_cache=False, **row_inputs)
        else:
            out = model(input_ids=dec_ids[None], use_cache=False, **row_inputs)
    return out.logits[0, -1].float()


def generation_gap(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                   max_new_tokens: int = 5, row_inputs: dict[str, torch.Tensor] | None = None,
                   **generate_kwargs: Any) -> float:
    """Worst absolute difference, over every generated step and row, between what
    ``generate`` computed (logits, or for beam search the returned beams' token scores)
    and a full no-cache forward over the same prefix. Greedy decoding.

    ``row_inputs`` are further inputs with one entry per row of ``input_ids`` (e.g.
    ``task_ids``): passed to ``generate`` as they are, and to each row's full forward as that
    row's entry."""
    encoder_decoder = bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))
    beams = generate_kwargs.get("num_beams", 1) > 1
    row_inputs = row_inputs or {}
    with torch.no_grad():
        out = model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
                             min_new_tokens=max_new_tokens, do_sample=False, return_dict_in_generate=True,
                             output_logits=True, output_scores=True, **row_inputs, **generate_kwargs)
    sequences = out.sequences
    start = 1 if encoder_decoder else input_ids.shape[1]  # where the generated tokens begin
    per_input = sequences.shape[0] // input_ids.shape[0]
    if beams:  # log-probabilities of each returned beam's tokens, as beam search scored them
        steps = _base(model).compute_transition_scores(sequences, out.scores, out.beam_indices, normalize_logits=False)
    worst = 0.0
    for row in range(sequences.shape[0]):
        source = row // per_input
        mask = None if attention_mask is None else attention_mask[source]
        for t in range(sequences.shape[1] - start):
            prefix = sequences[row, : start + t]
            if not encoder_decoder and mask is not None:  # the row as it would be without padding
                prefix = prefix[torch.cat([mask.bool(), torch.ones(t, dtype=torch.bool)])]
            this_row = {key: value[source : source + 1] for key, value in row_inputs.items()}
            full = _full_logits(model, encoder_decoder, input_ids[source], mask, prefix, this_row)
            if beams:
                token = sequences[row, start + t]
                expected = torch.log_softmax(full, dim=-1)[token]
                gap = (steps[row, t].float() - expected).abs().item()
            else:
                gap = (out.logits[t][row].float() - full).abs().max().item()
            worst = max(worst, gap)
    return worst


def _report(test: str, mode: str, gap: float) -> None:
    import json
    import os

    path = os.environ.get("PEFT_KERNEL_GENERATION_REPORT")
    if path:
        with open(path, "a") as file:
            file.write(json.dumps({"test": test, "mode": mode, "gap": gap}) + "\n")


def _base(model: nn.Module) -> nn.Module:
    getter = getattr(model, "get_base_model", None)
    return getter() if callable(getter) else model


class GenerationConformance:
    """Exact-generation contract tests; see the module docstring. Not collected by
    itself (no ``Test`` prefix)."""

    #: builds a small transformers causal LM (``None``: the method does not support one)
    causal_lm_fn: Callable[[], nn.Module] | None = None
    #: builds a small transformers encoder-decoder LM (``None``: not supported)
    seq2seq_lm_fn: Callable[[], nn.Module] | None = None
    #: ``config_fn(task_type)`` returns the method's config for that task type
    config_fn: Callable[[str], Any]
    #: ``row_inputs_fn(batch_size)``: further inputs, one entry per row (e.g. ``task_ids``), or ``None``
    row_inputs_fn: Callable[[int], dict[str, torch.Tensor]] | None = None
    atol: float = ATOL

    def _row_inputs(self, batch_size: int) -> dict[str, torch.Tensor]:
        return self.row_inputs_fn(batch_size) if self.row_inputs_fn is not None else {}

    def pytest_generate_tests(self, metafunc):
        if "causal_mode" in metafunc.fixturenames:
            modes = CAUSAL_MODES if self.causal_lm_fn is not None else []
            metafunc.parametrize("causal_mode", modes, ids=[m[0] for m in modes])
        if "seq2seq_mode" in metafunc.fixturenames:
            modes = SEQ2SEQ_MODES if self.seq2seq_lm_fn is not None else []
            metafunc.parametrize("seq2seq_mode", modes, ids=[m[0] for m in modes])

    def _adapted(self, model_fn, task_type: str) -> nn.Module:
        from .. import get_peft_model

        torch.manual_seed(0)
        model = get_peft_model(model_fn(), self.config_fn(task_type))
        perturb(model, seed=1, scale=0.5)  # a trained adapter, not an initial one
        return model.eval()

    def _check(self, model_fn, task_type: str, mode) -> None:
        name, kwargs, padded = mode
        model = self._adapted(model_fn, task_type)
        ids, mask = _inputs(model.config.vocab_size, padded)
        gap = generation_gap(model, ids, mask, row_inputs=self._row_inputs(ids.shape[0]), **kwargs)
        _report(f"{type(self).__name__}/{task_type}", name, gap)
        assert gap <= self.atol, f"{name}: generate's logits differ from a full forward by {gap:.3g} > {self.atol}"

    def test_causal_lm_generation_is_exact(self, causal_mode):
        self._check(self.causal_lm_fn, "CAUSAL_LM", causal_mode)

    def test_seq2seq_generation_is_exact(self, seq2seq_mode):
        self._check(self.seq2seq_lm_fn, "SEQ_2_SEQ_LM", seq2seq_mode)

    def test_causal_lm_generation_from_inputs_embeds_is_exact(self):
        """A prompt given as embeddings: every step equals a full forward over the same
        embeddings followed by the generated tokens' embeddings."""
        if self.causal_lm_fn is None:
            return
        model = self._adapted(self.causal_lm_fn, "CAUSAL_LM")
        ids, _ = _inputs(model.config.vocab_size, False)
        row_inputs = self._row_inputs(ids.shape[0])
        embed = model.get_input_embeddings()
        with torch.no_grad():
            prompt = embed(ids)
            out = model.generate(inputs_embeds=prompt, max_new_tokens=4, min_new_tokens=4, do_sample=False,
                                 return_dict_in_generate=True, output_logits=True, **row_inputs)
            worst = 0.0
            for t, step_logits in enumerate(out.logits):
                embeds = torch.cat((prompt, embed(out.sequences[:, :t])), dim=1)
                full = model(inputs_embeds=embeds, use_cache=False, **row_inputs).logits[:, -1]
                worst = max(worst, (step_logits - full).abs().max().item())
        _report(f"{type(self).__name__}/CAUSAL_LM", "inputs_embeds", worst)
        assert worst <= self.atol, f"generate from inputs_embeds differs from a full forward by {worst:.3g}"

    def test_adapter_changes_generation(self):
        """The comparisons above are not vacuous: the adapted model's logits are not the base's."""
        model_fn = self.causal_lm_fn or self.seq2seq_lm_fn
        task_type = "CAUSAL_LM" if self.causal_lm_fn is not None else "SEQ_2_SEQ_LM"
        model = self._adapted(model_fn, task_type)
        ids, _ = _inputs(model.config.vocab_size, False)
        kwargs = dict(max_new_tokens=3, do_sample=False, return_dict_in_generate=True, output_logits=True)
        with torch.no_grad():
            adapted = model.generate(input_ids=ids, **self._row_inputs(ids.shape[0]), **kwargs).logits[0]
            with model.disable_adapter():
                plain = model.generate(input_ids=ids, **kwargs).logits[0]
        assert (adapted - plain).abs().max().item() > 1e-3, "the adapter does not change generation"
