"""compinv: compositional inversion for Stable Diffusion."""
