"""The kernel's generic prompt-learning machinery, exercised by a prompt-learning method
the kernel has never seen (registered from plain code), on a plain ``nn.Module`` and on a
tiny transformers causal LM."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import pytest
import torch
from torch import nn

import peft_kernel
from peft_kernel import (
    PeftModel,
    PeftWarning,
    PromptLearningConfig,
    get_peft_model,
    inject_adapter_in_model,
    register_peft_method,
)
from peft_kernel.key_value_prompts import cache_keyword
from peft_kernel.plugins import reset_manager
from peft_kernel.prompt_learning import find_word_embeddings, prepare_config
from peft_kernel.testing import tiny_models

VOCAB = 40


@dataclass
class ToyPromptConfig(PromptLearningConfig):
    num_tasks: int = 1

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = "TOY_PROMPT"


class ToyPromptEncoder(nn.Module):
    """A table of virtual tokens, scaled per task; two tensors in the checkpoint."""

    checkpoint_keys = {"toy_table": "table", "toy_task_scale": "task_scale"}

    def __init__(self, config, word_embeddings):
        super().__init__()
        total = config.num_virtual_tokens * config.num_transformer_submodules
        self.table = nn.Parameter(torch.randn(total, config.token_dim))
        self.task_scale = nn.Parameter(torch.linspace(1.0, 2.0, config.num_tasks).view(-1, 1, 1))

    def forward(self, indices, task_ids=None):
        out = self.table[indices]
        if task_ids is not None:
            out = out * self.task_scale[task_ids]
        return out


@pytest.fixture(autouse=True)
def toy_method():
    reset_manager()
    register_peft_method(name="toy_prompt", config_cls=ToyPromptConfig, model_cls=ToyPromptEncoder)
    try:
        yield
    finally:
        reset_manager()


class TinyLM(nn.Module):
    """Not a transformers model: embeddings, causal mixing, a vocabulary head."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(VOCAB, 8)
        self.mix = nn.Linear(8, 8)
        self.lm_head = nn.Linear(8, VOCAB)

    def get_input_embeddings(self):
        return self.embed

    def forward(self, input_ids=None, inputs_embeds=None, attention_mask=None, labels=None):
        h = self.embed(input_ids) if inputs_embeds is None else inputs_embeds
        h = torch.tanh(self.mix(h)).cumsum(dim=1)  # position t sees positions <= t
        if attention_mask is not None:
            assert attention_mask.shape == h.shape[:2], "attention mask must cover the virtual tokens"
        logits = self.lm_head(h)
        loss = None
        if labels is not None:
            assert labels.shape == h.shape[:2], "labels must cover the virtual tokens"
            loss = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1),
                                               ignore_index=-100)
        return {"logits": logits, "loss": loss}


def ids(batch=2, length=5, seed=0):
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def tiny_llama():
    pytest.importorskip("transformers")
    return tiny_models.llama(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                             num_attention_heads=2, num_key_value_heads=1)


# -- a new prompt-learning method from plain code -------------------------------------


def test_trains_saves_and_reloads_a_new_prompt_learning_method(tmp_path):
    model = get_peft_model(TinyLM(), ToyPromptConfig(num_virtual_tokens=3, token_dim=8, num_tasks=2))
    assert isinstance(model, PeftModel) and model.peft_type == "TOY_PROMPT"
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable == ["prompt_encoder.default.table", "prompt_encoder.default.task_scale"]
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.1)
    x = ids(4, 6)
    losses = []
    for _ in range(15):
        loss = model(input_ids=x, labels=x)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses
    model.save_pretrained(tmp_path)
    from safetensors.torch import load_file

    assert sorted(load_file(tmp_path / "adapter_model.safetensors")) == ["toy_table", "toy_task_scale"]
    loaded = PeftModel.from_pretrained(TinyLM(), tmp_path)
    assert isinstance(loaded.peft_config["default"], ToyPromptConfig)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x)["logits"], model(x)["logits"])
    assert not any(p.requires_grad for p in loaded.parameters())


def test_task_ids_reach_the_encoder():
    model = get_peft_model(TinyLM(), ToyPromptConfig(num_virtual_tokens=2, token_dim=8, num_tasks=2))
    x = ids()
    with torch.no_grad():
        a = model(x, task_ids=torch.tensor([0, 0]))["logits"]
        b = model(x, task_ids=torch.tensor([1, 1]))["logits"]
        c = model(x, task_ids=torch.tensor([0, 1]))["logits"]
    assert not torch.allclose(a, b)
    torch.testing.assert_close(c[0], a[0])
    torch.testing.assert_close(c[1], b[1])


def test_masks_and_labels_cover_the_virtual_tokens():
    model = get_peft_model(TinyLM(), ToyPromptConfig(num_virtual_tokens=3, token_dim=8, task_type="CAUSAL_LM"))
    x = ids()
    out = model(input_ids=x, attention_mask=torch.ones_like(x), labels=x)  # TinyLM asserts the shapes
    assert out["logits"].shape == (2, 8, VOCAB)
    positional = model(x, torch.ones_like(x), None, x)
    torch.testing.assert_close(positional["logits"], out["logits"])
    with pytest.raises(TypeError, match="positional"):  # HF PEFT's 8 named inputs, then no more
        model(x, None, None, x, None, None, None, None, "one too many")
    with pytest.raises(TypeError, match="multiple values"):
        model(x, input_ids=x)


def test_second_adapter_switch_delete():
    model = get_peft_model(TinyLM(), ToyPromptConfig(num_virtual_tokens=3, token_dim=8))
    x = ids()
    first = model(x)["logits"].detach()
    model.add_adapter("b", ToyPromptConfig(num_virtual_tokens=5, token_dim=8))
    assert model.active_adapter == "default"
    assert not model.prompt_encoder["b"].table.requires_grad
    torch.testing.assert_close(model(x)["logits"], first)
    model.set_adapter("b")
    assert model(x)["logits"].shape == (2, 10, VOCAB)
    assert model.prompt_encoder["b"].table.requires_grad and not model.prompt_encoder["default"].table.requires_grad
    model.delete_adapter("b")
    assert model.active_adapter == "default" and list(model.prompt_encoder) == ["default"]
    assert model.prompt_encoder["default"].table.requires_grad
    torch.testing.assert_close(model(x)["logits"], first)


def test_failed_add_adapter_is_rolled_back():
    model = get_peft_model(TinyLM(), ToyPromptConfig(num_virtual_tokens=3, token_dim=8))
    with pytest.raises(ValueError, match="modules_to_save"):
        model.add_adapter("b", ToyPromptConfig(num_virtual_tokens=3, token_dim=8, modules_to_save=["nope"]))
    assert "b" not in model.peft_config and "b" not in model.prompt_encoder


def test_modules_to_save_with_prompt_learning(tmp_path):
    model = get_peft_model(TinyLM(), ToyPromptConfig(num_virtual_tokens=2, token_dim=8, modules_to_save=["lm_head"]))
    assert isinstance(model.base_model.lm_head, peft_kernel.ModulesToSaveWrapper)
    assert model.base_model.lm_head.modules_to_save["default"].weight.requires_grad
    assert not model.base_model.lm_head.original_module.weight.requires_grad
    with torch.no_grad():
        model.base_model.lm_head.modules_to_save["default"].bias.add_(1.0)
    x = ids()
    expected = model(x)["logits"]
    model.save_pretrained(tmp_path)
    from safetensors.torch import load_file

    assert sorted(load_file(tmp_path / "adapter_model.safetensors")) == [
        "base_model.lm_head.bias", "base_model.lm_head.weight", "toy_table", "toy_task_scale"]
    loaded = PeftModel.from_pretrained(TinyLM(), tmp_path)
    torch.testing.assert_close(loaded(x)["logits"], expected)
    with model.disable_adapter():  # the original head and no virtual tokens
        torch.testing.assert_close(model(x)["logits"], TinyLM()(x)["logits"])
    assert model.base_model.lm_head.modules_to_save["default"].weight.requires_grad, "flags not restored"
    status = model.get_model_status()
    assert status.available_adapters == ["default"]


# -- refusals ---------------------------------------------------------------------------


def test_layer_operations_are_refused():
    model = get_peft_model(TinyLM(), ToyPromptConfig(num_virtual_tokens=2, token_dim=8))
    for call in (model.merge_adapter, model.merge_and_unload, model.unload, model.unmerge_adapter):
        with pytest.raises(TypeError, match="prompt learning"):
            call()
    with pytest.raises(TypeError, match="prompt learning"):
        model.set_requires_grad("default")
    with pytest.raises(ValueError, match="prompt learning"):
        inject_adapter_in_model(ToyPromptConfig(num_virtual_tokens=2, token_dim=8), TinyLM())


def test_config_validation():
    with pytest.raises(ValueError, match="num_virtual_tokens"):
        get_peft_model(TinyLM(), ToyPromptConfig(token_dim=8))
    with pytest.raises(ValueError, match="token_dim"):
        get_peft_model(TinyLM(), ToyPromptConfig(num_virtual_tokens=2))  # TinyLM has no config


def test_dimensions_come_from_the_text_config_of_a_vlm():
    transformers = pytest.importorskip("transformers")
    model = TinyLM()
    model.config = transformers.LlavaConfig(
        text_config=transformers.LlamaConfig(hidden_size=24, num_hidden_layers=3, num_attention_heads=6),
        vision_config=transformers.CLIPVisionConfig(hidden_size=12, num_hidden_layers=1, num_attention_heads=2),
    )
    config = ToyPromptConfig(num_virtual_tokens=2, task_type="CAUSAL_LM")
    prepare_config(config, model)
    assert (config.token_dim, config.num_layers, config.num_attention_heads) == (24, 3, 6)
    assert config.num_transformer_submodules == 1
    seq2seq = ToyPromptConfig(num_virtual_tokens=2, task_type="SEQ_2_SEQ_LM")
    prepare_config(seq2seq, model)
    assert seq2seq.num_transformer_submodules == 2


def test_word_embeddings_fallbacks():
    class BertLike(nn.Module):
        def __init__(self):
            super().__init__()
            self.embeddings = nn.Module()
            self.embeddings.word_embeddings = nn.Embedding(VOCAB, 4)

    model = BertLike()
    assert find_word_embeddings(model) is model.embeddings.word_embeddings

    class Bare(nn.Module):
        def __init__(self):
            super().__init__()
            self.config = {"vocab_size": VOCAB}
            self.proj = nn.Linear(4, 4)
            self.table = nn.Embedding(VOCAB, 4)

    model = Bare()
    assert find_word_embeddings(model) is model.table
    with pytest.raises(ValueError, match="word embeddings"):
        find_word_embeddings(nn.Linear(3, 3))


# -- generation on a transformers model ----------------------------------------------


def greedy_by_hand(model, x, steps, **kwargs):
    """Greedy decoding with full forwards (no cache): the reference for generate."""
    for _ in range(steps):
        logits = model(input_ids=x, **kwargs).logits
        x = torch.cat([x, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return x


def test_generate_matches_greedy_forwards_and_task_ids():
    model = get_peft_model(tiny_llama(), ToyPromptConfig(num_virtual_tokens=3, task_type="CAUSAL_LM", num_tasks=2))
    x = ids(2, 4, seed=1)
    with torch.no_grad():
        for task in (0, 1):
            task_ids = torch.tensor([task, task])
            expected = greedy_by_hand(model, x, 5, task_ids=task_ids)
            out = model.generate(input_ids=x, max_new_tokens=5, do_sample=False, task_ids=task_ids)
            assert torch.equal(out, expected), (task, out.tolist(), expected.tolist())
    assert "prepare_inputs_for_generation" not in vars(model.base_model)


def test_generate_from_inputs_embeds():
    model = get_peft_model(tiny_llama(), ToyPromptConfig(num_virtual_tokens=3, task_type="CAUSAL_LM"))
    x = ids(2, 4, seed=1)
    with torch.no_grad():
        from_ids = model.generate(input_ids=x, max_new_tokens=4, do_sample=False)
        from_embeds = model.generate(inputs_embeds=model.word_embeddings(x), max_new_tokens=4, do_sample=False)
    assert torch.equal(from_embeds, from_ids[:, x.shape[1]:])


def test_generate_with_a_fixed_size_cache():
    model = get_peft_model(tiny_llama(), ToyPromptConfig(num_virtual_tokens=3, task_type="CAUSAL_LM"))
    x = ids(2, 4, seed=1)
    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
    with torch.no_grad():
        for kwargs in ({}, {"attention_mask": mask}):
            dynamic = model.generate(input_ids=x, max_new_tokens=4, do_sample=False, **kwargs)
            static = model.generate(input_ids=x, max_new_tokens=4, do_sample=False, cache_implementation="static",
                                    **kwargs)
            assert torch.equal(static, dynamic)


def test_generate_restores_the_model_after_an_error():
    model = get_peft_model(tiny_llama(), ToyPromptConfig(num_virtual_tokens=3, task_type="CAUSAL_LM"))
    with pytest.raises(ValueError, match="not_a_generate_argument"):  # transformers' check of model_kwargs
        model.generate(input_ids=ids(), max_new_tokens=2, not_a_generate_argument=1)
    assert "prepare_inputs_for_generation" not in vars(model.base_model)


def test_disable_adapter_runs_the_base_model_and_nests():
    base = tiny_llama()
    model = get_peft_model(tiny_llama(), ToyPromptConfig(num_virtual_tokens=3, task_type="CAUSAL_LM"))
    x = ids(2, 4, seed=1)
    with torch.no_grad():
        expected = base.generate(input_ids=x, max_new_tokens=4, do_sample=False)
        with model.disable_adapter():
            with model.disable_adapter():
                torch.testing.assert_close(model(input_ids=x).logits, base(input_ids=x).logits)
            assert torch.equal(model.generate(input_ids=x, max_new_tokens=4, do_sample=False), expected)
            torch.testing.assert_close(model(input_ids=x).logits, base(input_ids=x).logits)
        assert model(input_ids=x).logits.shape[1] == 7
        with pytest.raises(RuntimeError), model.disable_adapter():
            raise RuntimeError("boom")
        assert model(input_ids=x).logits.shape[1] == 7
    assert "prepare_inputs_for_generation" not in vars(model.base_model)


def test_incremental_decoding_by_hand_uses_the_cache():
    model = get_peft_model(tiny_llama(), ToyPromptConfig(num_virtual_tokens=3, task_type="CAUSAL_LM"))
    x = ids(2, 4, seed=1)
    nxt = ids(2, 1, seed=2)
    with torch.no_grad():
        full = model(input_ids=torch.cat([x, nxt], dim=1)).logits[:, -1]
        first = model(input_ids=x, attention_mask=torch.ones_like(x), use_cache=True)
        step = model(input_ids=nxt, attention_mask=torch.ones(2, 5, dtype=torch.long),
                     past_key_values=first.past_key_values).logits[:, -1]
    torch.testing.assert_close(step, full)


def test_position_ids_are_dropped_with_a_warning():
    model = get_peft_model(tiny_llama(), ToyPromptConfig(num_virtual_tokens=3, task_type="CAUSAL_LM"))
    x = ids(2, 4, seed=1)
    with pytest.warns(PeftWarning, match="position_ids"):
        with_positions = model(input_ids=x, position_ids=torch.arange(4).unsqueeze(0)).logits
    torch.testing.assert_close(with_positions, model(input_ids=x).logits)


def test_a_dict_mask_needs_exactly_one_entry():
    model = get_peft_model(tiny_llama(), ToyPromptConfig(num_virtual_tokens=3, task_type="CAUSAL_LM"))
    config = model.active_peft_config
    x = ids(2, 4, seed=1)

    def original(*args, **kwargs):
        return kwargs

    out = model.prompt_learning._prepare_step(original, config, None, x, attention_mask={"full": torch.ones_like(x)})
    assert out["attention_mask"].shape == (2, 7) and out["inputs_embeds"].shape == (2, 7, 16)
    with pytest.raises(ValueError, match="single attention mask"):
        model.prompt_learning._prepare_step(original, config, None, x,
                                            attention_mask={"a": torch.ones_like(x), "b": torch.ones_like(x)})
    four_d = torch.zeros(2, 1, 4, 4)
    four_d[0, :, :, 0] = float("-inf")  # first position of sample 0 is padding
    out = model.prompt_learning._prepare_step(original, config, None, x, attention_mask=four_d)
    assert out["attention_mask"].tolist() == [[1, 1, 1, 0, 1, 1, 1], [1] * 7]


def test_low_cpu_mem_usage_builds_the_encoder_on_meta(tmp_path):
    model = get_peft_model(TinyLM(), ToyPromptConfig(num_virtual_tokens=2, token_dim=8))
    model.save_pretrained(tmp_path)
    empty = get_peft_model(TinyLM(), ToyPromptConfig(num_virtual_tokens=2, token_dim=8), low_cpu_mem_usage=True)
    assert empty.prompt_encoder["default"].table.device.type == "meta"
    loaded = PeftModel.from_pretrained(TinyLM(), tmp_path, low_cpu_mem_usage=True)
    assert loaded.prompt_encoder["default"].table.device.type == "cpu"
    torch.testing.assert_close(loaded(ids())["logits"], model(ids())["logits"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded.print_trainable_parameters()


# -- prompts as per-layer keys and values (a method the kernel has never seen) --------------


@dataclass
class ToyKeyValueConfig(PromptLearningConfig):
    injects_key_values = True

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = "TOY_KEY_VALUE"


class ToyKeyValueEncoder(nn.Module):
    """One tensor holds every layer's keys and values: (layers, 2, heads, n, head_dim)."""

    checkpoint_keys = {"toy_keys_values": "keys_values"}

    def __init__(self, config, word_embeddings):
        super().__init__()
        heads = config.num_attention_heads
        shape = (config.num_layers, 2, heads, config.num_virtual_tokens, config.token_dim // heads)
        self.keys_values = nn.Parameter(torch.randn(shape))

    def forward(self, indices):  # one row of width layers·2·heads·head_dim per virtual token
        per_token = self.keys_values.permute(3, 0, 1, 2, 4).flatten(1)
        return per_token[indices]

    def key_values(self, prompts):
        layers, _, heads, n, head_dim = self.keys_values.shape
        return prompts.view(prompts.shape[0], n, layers, 2, heads, head_dim).permute(2, 3, 0, 4, 1, 5)


def key_value_model():
    register_peft_method(name="toy_key_value", config_cls=ToyKeyValueConfig, model_cls=ToyKeyValueEncoder)
    return get_peft_model(tiny_llama(), ToyKeyValueConfig(num_virtual_tokens=3, task_type="CAUSAL_LM"))


def test_key_value_prompts_are_the_models_cache():
    """The forward equals the base model continuing from a cache that holds the prompts: masks
    cover them, positions start after them, outputs keep their length. Dimensions describe the
    grouped-query keys and values (1 head of 8)."""
    import transformers

    model = key_value_model()
    config = model.peft_config["default"]
    assert (config.token_dim, config.num_attention_heads, config.num_layers) == (8, 1, 1)
    x, mask = ids(2, 4, seed=1), torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
    cache = transformers.DynamicCache()
    table = model.prompt_encoder["default"].keys_values
    cache.update(table[0, 0].expand(2, -1, -1, -1), table[0, 1].expand(2, -1, -1, -1), 0)
    full_mask = torch.cat((torch.ones(2, 3, dtype=torch.long), mask), dim=1)
    with torch.no_grad():
        expected = model.base_model(input_ids=x, attention_mask=full_mask,
                                    **{cache_keyword(model.base_model): cache}).logits
        torch.testing.assert_close(model(input_ids=x, attention_mask=mask).logits, expected)
        assert isinstance(model.get_prompt(2), transformers.Cache)


def test_key_value_prompts_generate_like_full_forwards():
    model = key_value_model()
    x = ids(2, 4, seed=1)
    with torch.no_grad():
        expected = greedy_by_hand(model, x, 4)
        for kwargs in ({}, {"cache_implementation": "static"}, {"use_cache": False}):
            assert torch.equal(model.generate(input_ids=x, max_new_tokens=4, do_sample=False, **kwargs), expected)
    assert "prepare_inputs_for_generation" not in vars(model.base_model)


def test_a_key_value_encoder_must_lay_out_its_prompts():
    class NoLayout(ToyKeyValueEncoder):
        key_values = None

    register_peft_method(name="toy_key_value", config_cls=ToyKeyValueConfig, model_cls=NoLayout)
    with pytest.raises(TypeError, match="key_values"):
        get_peft_model(tiny_llama(), ToyKeyValueConfig(num_virtual_tokens=3, task_type="CAUSAL_LM"))
