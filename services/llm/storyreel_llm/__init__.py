"""storyreel LLM service: writes storyboards (title, characters, scenes) with an LLM."""
