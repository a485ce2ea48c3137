"""A tiny SD-FSMIS architecture (UNet and VAE arguments) for fast tests."""

TINY = {
    "unet": {"sample_size": 8, "in_channels": 4, "out_channels": 4, "block_out_channels": [16, 32],
             "layers_per_block": 1, "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
             "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"], "cross_attention_dim": 16,
             "attention_head_dim": 2, "norm_num_groups": 8},
    "vae": {"in_channels": 3, "out_channels": 3, "block_out_channels": [8, 16],
            "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D"],
            "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D"], "latent_channels": 4,
            "norm_num_groups": 8, "layers_per_block": 1},
}
