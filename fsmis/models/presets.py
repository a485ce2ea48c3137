"""UNet / VAE architecture presets (plain, YAML-safe dicts of diffusers constructor arguments).

``SD15_UNET``/``SD15_VAE`` (UNet 859.52 M parameters, 16 ``attn1`` layers, cross-attention 768),
``SD21_UNET``/``SD21_VAE`` (865.91 M, cross-attention 1024), ``TINY_UNET``/``TINY_VAE`` (tests);
``model.unet: sd15`` in a config file picks one by name. ``tools/make_random_sd.py`` writes any of
them as a diffusers folder with random weights.
"""
from __future__ import annotations

import copy

from ..config import ConfigError


SD15_UNET = {
    "sample_size": 64, "in_channels": 4, "out_channels": 4, "center_input_sample": False,
    "flip_sin_to_cos": True, "freq_shift": 0,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "block_out_channels": [320, 640, 1280, 1280], "layers_per_block": 2, "downsample_padding": 1,
    "mid_block_scale_factor": 1, "act_fn": "silu", "norm_num_groups": 32, "norm_eps": 1e-5,
    "cross_attention_dim": 768, "attention_head_dim": 8,
}
SD15_VAE = {
    "sample_size": 512, "in_channels": 3, "out_channels": 3, "latent_channels": 4,
    "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512], "layers_per_block": 2, "act_fn": "silu",
    "norm_num_groups": 32, "scaling_factor": 0.18215,
}
SD21_UNET = {**SD15_UNET, "sample_size": 96, "cross_attention_dim": 1024, "attention_head_dim": [5, 10, 20, 20],
             "use_linear_projection": True}
SD21_VAE = {**SD15_VAE, "sample_size": 768}
TINY_UNET = {
    "sample_size": 16, "in_channels": 4, "out_channels": 4, "block_out_channels": [32, 64], "layers_per_block": 1,
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"], "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
    "cross_attention_dim": 32, "attention_head_dim": 2, "norm_num_groups": 8,
}
TINY_VAE = {
    "sample_size": 32, "in_channels": 3, "out_channels": 3, "latent_channels": 4, "block_out_channels": [16, 32],
    "down_block_types": ["DownEncoderBlock2D"] * 2, "up_block_types": ["UpDecoderBlock2D"] * 2,
    "layers_per_block": 1, "norm_num_groups": 8,
}
PRESETS = {"sd15": (SD15_UNET, SD15_VAE), "sd21": (SD21_UNET, SD21_VAE), "tiny": (TINY_UNET, TINY_VAE)}


def preset(name: str, part: str = "unet") -> dict:
    """A deep copy of a preset: ``preset("sd15", "unet")``, ``preset("tiny", "vae")``."""
    if name not in PRESETS:
        raise ConfigError(f"unknown architecture preset {name!r} ({' | '.join(PRESETS)})")
    if part not in ("unet", "vae"):
        raise ValueError(f"part must be 'unet' or 'vae', got {part!r}")
    return copy.deepcopy(PRESETS[name][0 if part == "unet" else 1])

