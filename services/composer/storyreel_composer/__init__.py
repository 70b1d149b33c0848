"""storyreel composer service: scene images plus narration or audio become a moving,
captioned MP4."""
