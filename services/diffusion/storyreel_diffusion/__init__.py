"""storyreel render service: draws scene images with a diffusion model."""
