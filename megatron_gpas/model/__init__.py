"""Model: Megatron-Core GPTModel with our layer spec (norm schemes + GPAS)."""
