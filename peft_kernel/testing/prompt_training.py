"""Training paths every prompt-learning method must support, run by the method against itself:
inputs given as embeddings, gradient checkpointing, and a task head trained next to the prompt
(``modules_to_save``).

Subclass :class:`PromptTrainingConformance` in the plugin's tests::

    from peft_kernel.testing import tiny_models as M
    from peft_kernel.testing.prompt_training import PromptTrainingConformance

    class TestMyPromptMethodTraining(PromptTrainingConformance):
        causal_lm_fn = staticmethod(M.llama)          # any transformers causal LM
        seq2seq_lm_fn = staticmethod(M.t5)            # or None
        seq_cls_fn = staticmethod(M.bert_cls)         # a model with a classification head, or None
        config_fn = staticmethod(lambda task_type: MyConfig(task_type=task_type, num_virtual_tokens=4))

The model runs in training mode (dropout seeded alike for the runs compared). A few AdamW steps
on one batch must lower the loss and leave the base model's weights as they were, and a saved
adapter reloaded with ``is_trainable=True`` must give the saved outputs and train.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .conformance import perturb
from .differential import assert_close, output

#: task types of the builders
_TASKS = {"causal_lm_fn": "CAUSAL_LM", "seq2seq_lm_fn": "SEQ_2_SEQ_LM", "seq_cls_fn": "SEQ_CLS"}


def _inputs(model: nn.Module, task_type: str, batch: int = 2, length: int = 6) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, model.config.vocab_size, (batch, length), generator=generator)
    if task_type == "SEQ_2_SEQ_LM":
        labels = torch.randint(3, model.config.vocab_size, (batch, 3), generator=generator)
    elif task_type == "SEQ_CLS":
        labels = torch.randint(0, model.config.num_labels, (batch,), generator=generator)
    else:
        labels = ids
    return {"input_ids": ids, "labels": labels}


class PromptTrainingConformance:
    """Training-path contract tests; see the module docstring. Not collected by itself (no
    ``Test`` prefix)."""

    #: builds a small transformers causal LM (``None``: the method does not support one)
    causal_lm_fn: Callable[[], nn.Module] | None = None
    #: builds a small transformers encoder-decoder LM (``None``: not supported)
    seq2seq_lm_fn: Callable[[], nn.Module] | None = None
    #: builds a small transformers model with a ``classifier`` head (``None``: not supported)
    seq_cls_fn: Callable[[], nn.Module] | None = None
    #: ``config_fn(task_type)`` returns the method's config for that task type
    config_fn: Callable[[str], Any]
    #: ``row_inputs_fn(batch_size)``: further inputs, one entry per row (e.g. ``task_ids``), or ``None``
    row_inputs_fn: Callable[[int], dict[str, torch.Tensor]] | None = None
    #: AdamW learning rate of :meth:`test_training_lowers_the_loss_and_leaves_the_base_alone`
    learning_rate: float = 0.05

    def pytest_generate_tests(self, metafunc):
        if "builder" in metafunc.fixturenames:
            names = [n for n in ("causal_lm_fn", "seq2seq_lm_fn") if getattr(self, n) is not None]
            metafunc.parametrize("builder", names, ids=[_TASKS[n] for n in names])

    def _adapted(self, builder: str) -> tuple[nn.Module, dict[str, torch.Tensor]]:
        from .. import get_peft_model

        task_type = _TASKS[builder]
        torch.manual_seed(0)
        model = get_peft_model(getattr(self, builder)(), self.config_fn(task_type))
        perturb(model, seed=1, scale=0.5)  # a trained adapter, not an initial one
        inputs = _inputs(model, task_type)
        if self.row_inputs_fn is not None:
            inputs.update(self.row_inputs_fn(inputs["input_ids"].shape[0]))
        return model.train(), inputs

    @staticmethod
    def _prompt_grads(model: nn.Module) -> dict[str, torch.Tensor]:
        return {name: param.grad.clone() for name, param in model.named_parameters()
                if param.requires_grad and name.startswith("prompt_encoder.") and param.grad is not None}

    def test_inputs_embeds_give_the_same_output(self, builder):
        """``inputs_embeds=embed(input_ids)`` is the same call as ``input_ids``: outputs and loss."""
        model, inputs = self._adapted(builder)
        model.eval()
        embeds = model.get_input_embeddings()(inputs["input_ids"])
        from_embeds = {**{k: v for k, v in inputs.items() if k != "input_ids"}, "inputs_embeds": embeds}
        with torch.no_grad():
            expected, actual = model(**inputs), model(**from_embeds)
        assert_close(output(actual), output(expected), "output from inputs_embeds")
        assert_close(actual.loss, expected.loss, "loss from inputs_embeds")

    def test_gradient_checkpointing_changes_nothing(self, builder):
        """Same loss and prompt gradients with the base model's gradient checkpointing on; the
        prompt gets a gradient at all. (Key/value prompts need a transformers whose checkpointed
        layers can keep a cache; with another, training with checkpointing must be refused.)"""
        from ..key_value_prompts import checkpointing_keeps_caches

        model, inputs = self._adapted(builder)
        if model.active_peft_config.injects_key_values and not checkpointing_keeps_caches():
            import pytest

            model.get_base_model().gradient_checkpointing_enable()
            with pytest.raises(ValueError, match="Gradient checkpointing drops the key/value cache"):
                model(**inputs)
            return
        results = []
        for checkpointing in (False, True):
            if checkpointing:
                model.get_base_model().gradient_checkpointing_enable()
            model.zero_grad()
            torch.manual_seed(3)
            loss = model(**inputs).loss
            loss.backward()
            results.append((loss.detach(), self._prompt_grads(model)))
        (loss, grads), (checkpointed_loss, checkpointed_grads) = results
        assert grads and any(g.abs().sum() > 0 for g in grads.values()), "the prompt gets no gradient"
        assert_close(checkpointed_loss, loss, "loss with gradient checkpointing")
        assert checkpointed_grads.keys() == grads.keys()
        for name, grad in grads.items():
            assert_close(checkpointed_grads[name], grad, f"gradient of {name} with gradient checkpointing")

    def test_classification_head_trains_and_is_saved(self, tmp_path):
        """``SEQ_CLS`` adds the head to ``modules_to_save``: its copy trains with the prompt and
        is saved with it; the original head stays frozen."""
        if self.seq_cls_fn is None:
            return
        model, inputs = self._adapted("seq_cls_fn")
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        heads = {n for n in trainable if ".modules_to_save.default." in n}
        assert heads and trainable - heads and all(n.startswith("prompt_encoder.") for n in trainable - heads)
        assert not any(".original_module." in n for n in trainable)
        model(**inputs).loss.backward()
        for name, param in model.named_parameters():
            if name in trainable:
                assert param.grad is not None and param.grad.abs().sum() > 0, f"{name} gets no gradient"
        model.save_pretrained(tmp_path)
        from safetensors.torch import load_file

        saved = set(load_file(tmp_path / "adapter_model.safetensors"))
        assert {n.replace(".modules_to_save.default", "") for n in heads} <= saved

    def test_training_lowers_the_loss_and_leaves_the_base_alone(self):
        builder = "causal_lm_fn" if self.causal_lm_fn is not None else "seq2seq_lm_fn"
        model, inputs = self._adapted(builder)
        base = {k: v.clone() for k, v in model.get_base_model().state_dict().items()}
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=self.learning_rate)
        losses = []
        for _ in range(10):
            loss = model(**inputs).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        assert losses[-1] < losses[0] - 0.05, f"the loss did not fall: {losses}"
        for key, value in model.get_base_model().state_dict().items():
            assert torch.equal(value, base[key]), f"training changed the base model's {key}"

    def test_trainable_reload_keeps_the_saved_prompt(self, tmp_path):
        """``from_pretrained(..., is_trainable=True)`` rebuilds the saved layout: the same outputs as
        the saved adapter, and trainable prompt tensors (only those)."""
        from .. import PeftModel

        builder = "causal_lm_fn" if self.causal_lm_fn is not None else "seq2seq_lm_fn"
        model, inputs = self._adapted(builder)
        model.eval().save_pretrained(tmp_path)
        with torch.no_grad():
            expected = output(model(**inputs))
        torch.manual_seed(0)
        reloaded = PeftModel.from_pretrained(getattr(self, builder)(), tmp_path, is_trainable=True).eval()
        trainable = [n for n, p in reloaded.named_parameters() if p.requires_grad]
        assert trainable and all(n.startswith("prompt_encoder.default.") for n in trainable), trainable
        assert not reloaded.peft_config["default"].inference_mode
        with torch.no_grad():
            assert_close(output(reloaded(**inputs)), expected, "trainable reload")
        reloaded.train()
        reloaded(**inputs).loss.backward()
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in reloaded.parameters() if p.requires_grad)
