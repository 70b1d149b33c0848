"""storyreel diffusion service: draws scene images with a diffusion model."""
