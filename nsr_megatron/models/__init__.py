"""Megatron-Core models built from Hugging Face configs (the project's megatron boundary)."""
