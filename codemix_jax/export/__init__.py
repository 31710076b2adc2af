"""Hugging Face export: a run's checkpoint as a folder transformers loads (see ``hf_folder``)."""

from codemix_jax.export.architectures import UnsupportedArchitectureError
from codemix_jax.export.hf_folder import export_hf
from codemix_jax.export.tokenizer import UnsupportedVocabularyError

__all__ = ["UnsupportedArchitectureError", "UnsupportedVocabularyError", "export_hf"]
