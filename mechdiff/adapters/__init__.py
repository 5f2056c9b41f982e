"""Adapters that plug into a HookedTransformer: transcoder adapters, rank-r LoRA, and their file formats."""
