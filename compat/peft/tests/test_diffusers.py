"""diffusers on peft-kernel: a LoRA made with diffusers and HF PEFT loads through
``load_lora_weights`` and is weighted with ``set_adapters``; a LoRA trained here, the way diffusers'
training scripts do it, loads in diffusers with HF PEFT. Both computed on a tiny UNet."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict

diffusers = pytest.importorskip("diffusers")

UNET = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=8, attention_head_dim=2,
            norm_num_groups=4)
TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


@pytest.fixture(scope="module")
def unet_dir(tmp_path_factory) -> str:
    """The tiny UNet, saved, and the inputs its outputs are compared on (inputs.pt)."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-unet")
    diffusers.UNet2DConditionModel(**UNET).save_pretrained(path)
    g = torch.Generator().manual_seed(0)
    latents, timesteps, text = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([1, 10]), torch.randn(2, 3, 8)
    torch.save({"latents": latents, "timesteps": timesteps, "text": text}, path / "inputs.pt")
    return str(path)


def unet_output(unet, unet_dir) -> torch.Tensor:
    inputs = torch.load(unet_dir + "/inputs.pt", weights_only=True)
    with torch.no_grad():
        return unet(inputs["latents"], inputs["timesteps"], encoder_hidden_states=inputs["text"]).sample


# unet_output in the HF PEFT interpreter
HF_UNET_OUTPUT = """
inputs = torch.load({unet_dir!r} + "/inputs.pt", weights_only=True)
def unet_output():
    with torch.no_grad():
        return unet(inputs["latents"], inputs["timesteps"], encoder_hidden_states=inputs["text"]).sample
"""


def pipeline(unet_dir):
    unet = diffusers.UNet2DConditionModel.from_pretrained(unet_dir)
    return diffusers.StableDiffusionPipeline(
        vae=None, text_encoder=None, tokenizer=None, unet=unet, safety_checker=None, feature_extractor=None,
        scheduler=diffusers.DDPMScheduler(steps_offset=1, clip_sample=False), requires_safety_checker=False)


def test_load_lora_weights_and_set_adapters(unet_dir, tmp_path, hf_peft):
    hf_peft.run(f"""
        import torch
        from diffusers import StableDiffusionPipeline, UNet2DConditionModel
        from peft import LoraConfig
        from peft.utils import get_peft_model_state_dict
        unet = UNet2DConditionModel.from_pretrained({unet_dir!r})
        torch.manual_seed(3)
        unet.add_adapter(LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules={TARGETS!r}))
        StableDiffusionPipeline.save_lora_weights({str(tmp_path / "lora")!r},
                                                  unet_lora_layers=get_peft_model_state_dict(unet),
                                                  unet_lora_adapter_metadata=unet.peft_config["default"].to_dict())
        full = unet_output()
        unet.set_adapters(["default"], weights=[0.5])
        torch.save({{"full": full, "half": unet_output()}}, {str(tmp_path / "hf.pt")!r})
    """, HF_UNET_OUTPUT.format(unet_dir=unet_dir))
    theirs = torch.load(tmp_path / "hf.pt", weights_only=True)
    pipe = pipeline(unet_dir)
    base = unet_output(pipe.unet, unet_dir)
    pipe.load_lora_weights(str(tmp_path / "lora"), adapter_name="style")
    torch.testing.assert_close(unet_output(pipe.unet, unet_dir), theirs["full"], atol=1e-5, rtol=0)
    pipe.set_adapters(["style"], adapter_weights=[0.5])
    torch.testing.assert_close(unet_output(pipe.unet, unet_dir), theirs["half"], atol=1e-5, rtol=0)
    pipe.disable_lora()
    torch.testing.assert_close(unet_output(pipe.unet, unet_dir), base)
    pipe.enable_lora()
    torch.testing.assert_close(unet_output(pipe.unet, unet_dir), theirs["half"], atol=1e-5, rtol=0)


def test_a_lora_trained_here_loads_in_diffusers_with_hf_peft(unet_dir, tmp_path, hf_peft):
    unet = diffusers.UNet2DConditionModel.from_pretrained(unet_dir)
    unet.requires_grad_(False)
    torch.manual_seed(0)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=8, init_lora_weights="gaussian", target_modules=TARGETS))
    trainable = [p for p in unet.parameters() if p.requires_grad]
    assert trainable and all(isinstance(p, torch.nn.Parameter) for p in trainable)
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    g = torch.Generator().manual_seed(1)
    for _ in range(3):  # a few denoising-loss steps, as diffusers' LoRA training scripts take
        latents, noise, text = (torch.randn(shape, generator=g) for shape in ((2, 4, 8, 8), (2, 4, 8, 8), (2, 3, 8)))
        predicted = unet(latents + noise, torch.tensor([5, 50]), encoder_hidden_states=text)
        loss = torch.nn.functional.mse_loss(predicted.sample, noise)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    diffusers.StableDiffusionPipeline.save_lora_weights(
        str(tmp_path / "lora"), unet_lora_layers=get_peft_model_state_dict(unet),
        unet_lora_adapter_metadata=unet.peft_config["default"].to_dict())
    ours = unet_output(unet, unet_dir)
    assert not torch.allclose(ours, unet_output(diffusers.UNet2DConditionModel.from_pretrained(unet_dir), unet_dir))
    hf_peft.run(f"""
        import torch
        from diffusers import UNet2DConditionModel
        unet = UNet2DConditionModel.from_pretrained({unet_dir!r})
        unet.load_lora_adapter({str(tmp_path / "lora")!r}, prefix="unet", adapter_name="trained",
                               weight_name="pytorch_lora_weights.safetensors")
        torch.save(unet_output(), {str(tmp_path / "hf.pt")!r})
    """, HF_UNET_OUTPUT.format(unet_dir=unet_dir))
    torch.testing.assert_close(torch.load(tmp_path / "hf.pt", weights_only=True), ours, atol=1e-5, rtol=0)
