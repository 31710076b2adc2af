"""Input pipeline throughput (read, tokenize or not, pack, mix, batch) vs what a TPU host needs.

Measures tokens per CPU-second of the full MixtureInput pipeline on this machine's local corpus,
once reading raw text (tokenized on the fly) and once reading shards pre-tokenized by
`codemix ingest --vocab_path`. It then compares one v5e host's worth of cores against the rate
that host's 4 chips consume when training the 470M model at 50 % MFU.

    python bench/input_throughput.py [--batches 200] [--seq_len 8192]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import time

import gin

from codemix_jax import gin_config
from codemix_jax.data import MixtureInput
from codemix_jax.data.corpus import SOURCES, read_documents
from codemix_jax.data.ingest import ingest
from codemix_jax.data.sources import Source, local_sources
from codemix_jax.model import ModelConfig, training_flops_per_token

V5E_PEAK_BF16 = 197e12  # FLOP/s per chip
V5E_CHIPS_PER_HOST = 4
V5E_HOST_VCPUS = 112  # ct5lp-hightpu-4t
TARGET_MFU = 0.5
CORPUS = "data/local/corpus"
VOCAB = "data/local/spm.model"


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def measure(sources: list[Source], *, seq_len: int, batches: int) -> tuple[float, float]:
    """(tokens per CPU-second, tokens per wall-second) after a warm-up batch."""
    dataset = MixtureInput(
        sources=sources,
        vocab_path=VOCAB,
        shares={"code": 0.5, "text": 0.4, "markup": 0.1},
        seq_len=seq_len,
        global_batch_size=8,
        num_threads=1,
    )
    iterator = dataset.host_batches()
    next(iterator)
    cpu, wall = cpu_seconds(), time.perf_counter()
    for _ in range(batches):
        next(iterator)
    tokens = batches * dataset.global_batch_size * seq_len
    return tokens / (cpu_seconds() - cpu), tokens / (time.perf_counter() - wall)


def pretokenized_sources(work_dir: str) -> list[Source]:
    """Ingest the local corpus's train split into pre-tokenized shards."""
    sources = []
    for name in SOURCES:
        jsonl = os.path.join(work_dir, f"{name}.jsonl")
        with open(jsonl, "w") as f:
            for text in read_documents(corpus_dir=CORPUS, source=name, split="train"):
                f.write(json.dumps({"text": text}) + "\n")
        out_dir = os.path.join(work_dir, name)
        manifest = ingest(inputs=[jsonl], out_dir=out_dir, vocab_path=VOCAB, validation_fraction=0)
        train = manifest["totals"]["splits"]["train"]
        print(
            f"{name}: {train['docs']} documents, {train['tokens'] / train['docs']:,.0f} tokens each"
        )
        sources.append(
            Source(
                name=name,
                category=name,
                train=f"{out_dir}/train-*.tfrecord",
                pretokenized=True,
            )
        )
    return sources


def needed_tokens_per_second(seq_len: int) -> float:
    gin_config.parse(["gin/models/470m.gin"])
    flops = training_flops_per_token(ModelConfig(), seq_len)
    gin.clear_config()
    return TARGET_MFU * V5E_CHIPS_PER_HOST * V5E_PEAK_BF16 / flops


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batches", type=int, default=200)
    parser.add_argument("--seq_len", type=int, default=8192)
    args = parser.parse_args()
    needed = needed_tokens_per_second(args.seq_len)
    print(
        f"470M at {TARGET_MFU:.0%} MFU on one v5e host ({V5E_CHIPS_PER_HOST} chips) consumes "
        f"{needed:,.0f} tokens/s"
    )
    with tempfile.TemporaryDirectory() as work_dir:
        variants = {
            "raw text (tokenize on the fly)": local_sources(corpus_dir=CORPUS),
            "pre-tokenized at ingest": pretokenized_sources(work_dir),
        }
        for label, sources in variants.items():
            per_cpu, per_wall = measure(sources, seq_len=args.seq_len, batches=args.batches)
            host = per_cpu * V5E_HOST_VCPUS
            print(
                f"{label}: {per_cpu:,.0f} tokens/CPU-s ({per_wall:,.0f} tokens/s wall); "
                f"x{V5E_HOST_VCPUS} vCPUs = {host:,.0f} tokens/s per host; "
                f"headroom {host / needed:.1f}x (target >= 10x)"
            )


if __name__ == "__main__":
    main()
