"""Data tooling: turning raw text into Megatron indexed datasets (see ``preprocess``)."""
