"""Readers of model checkpoints (HF safetensors directories, GGUF) and the expert image format."""
