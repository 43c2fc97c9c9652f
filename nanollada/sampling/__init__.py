"""Sampling for both paradigms: autoregressive decoding and masked-diffusion (LLaDA-style) iterative unmasking."""
