"""codemix_jax: pre-training studies of code in LLM data mixtures, in JAX."""

import os

# TensorFlow (used only for tf.data/seqio) logs C++ start-up noise unless told otherwise.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
