"""Latent diffusion in the Stable Diffusion layout: components, the noise-aware prototype classifier, training."""
