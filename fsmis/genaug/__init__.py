"""The generative augmentation branch (docs/generative-augmentation.md).

- :mod:`fsmis.genaug.generator`: a mask-conditioned latent diffusion model in the latent space
  of SD-FSMIS's frozen VAE (``method: generator``), its DDIM sampler with classifier-free
  guidance, and the exported UNet that initialises SD-FSMIS (``model.unet_init``).
"""
