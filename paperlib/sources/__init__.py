"""What SAEs read: synthetic model organisms with a known dictionary, and cached LLM activations on a corpus."""
