"""Hugging Face interoperability: export (tools/convert_to_hf.py), import (tools/convert_from_hf.py).

``configuration_megatron_gpas.py`` and ``modeling_megatron_gpas.py`` are the self-contained
model code copied into exported directories; they must not import from this package.
"""
