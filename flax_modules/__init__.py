"""Flax linen/nnx attention modules (shipped as jax_flash.flax_modules); filled by the Flax issue."""
