"""storyreel composer service: scene images plus narration or audio become an MP4."""
