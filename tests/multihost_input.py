"""One process of test_multihost: read this host's input, assemble global batches, checkpoint
and resume the input, read a small corpus for more than an epoch, and save what it saw.

Run as ``python tests/multihost_input.py PROCESS_ID PORT CORPUS_DIR SMALL_CORPUS_DIR VOCAB_PATH
OUT_DIR``; two such processes form one JAX cluster on localhost (2 CPU devices each).
"""

import functools
import sys

import jax

jax.config.update("jax_num_cpu_devices", 2)

import numpy as np  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402

from codemix_jax import sharding  # noqa: E402
from codemix_jax.checkpoint import Checkpoints  # noqa: E402
from codemix_jax.data import MixtureInput, load_vocab  # noqa: E402
from codemix_jax.data.corpus import read_documents  # noqa: E402
from codemix_jax.data.sources import local_sources  # noqa: E402
from codemix_jax.train_state import global_batch  # noqa: E402

STEPS = 6
META = {"model_config": {"d_model": 8}}
MAX_EPOCH_STEPS = 500


def assemble_and_resume(corpus_dir: str, vocab_path: str, out_dir: str) -> dict[str, np.ndarray]:
    """Host rows and the assembled global rows of STEPS batches, then the next 3 host batches
    both straight on and after a two-process checkpoint and resume."""
    mesh = sharding.make_mesh(data=1, fsdp=-1, tensor=1)
    dataset = MixtureInput(
        sources=local_sources(corpus_dir=corpus_dir),
        vocab_path=vocab_path,
        shares={"code": 0.5, "text": 0.3, "markup": 0.2},
        seq_len=32,
        global_batch_size=8,
    )
    host_batches = functools.partial(
        dataset.host_batches, process_index=jax.process_index(), process_count=jax.process_count()
    )
    batches = host_batches()
    host_rows, global_rows = [], []
    for _ in range(STEPS):
        host = next(batches)
        assembled = global_batch(host, mesh)["targets"]
        host_rows.append(host["targets"])
        global_rows.append(multihost_utils.process_allgather(assembled, tiled=True))

    # Both processes checkpoint together (orbax, one input state each), go on, then resume.
    checkpoints = Checkpoints(f"{out_dir}/checkpoints", save_every=1)
    checkpoints.save(STEPS, state={"rows": assembled}, batches=batches, meta=META)
    checkpoints.close()
    after_save = [next(batches)["targets"] for _ in range(3)]
    resumed = host_batches()
    Checkpoints(f"{out_dir}/checkpoints", save_every=1).restore(
        STEPS, abstract_state={"rows": assembled}, batches=resumed, meta=META
    )
    after_restore = [next(resumed)["targets"] for _ in range(3)]
    return dict(
        host_rows=np.stack(host_rows),
        global_rows=np.stack(global_rows),
        after_save=np.stack(after_save),
        after_restore=np.stack(after_restore),
    )


def deliver_an_epoch(corpus_dir: str, vocab_path: str) -> dict[str, np.ndarray]:
    """This host's batches of a small corpus until it has read at least one epoch of its shard of
    every source: as many tokens of each source as the whole source holds.

    The sources' row shuffle is off (a buffer of one row): it only reorders rows within one
    host's stream of one source, and documents can be read back only from rows in packing order.
    """
    sources = local_sources(corpus_dir=corpus_dir)
    dataset = MixtureInput(
        sources=sources,
        vocab_path=vocab_path,
        shares={"code": 0.5, "text": 0.25, "markup": 0.25},
        seq_len=256,
        global_batch_size=16,
        shuffle_buffer_size=1,
    )
    batches = dataset.host_batches(
        process_index=jax.process_index(), process_count=jax.process_count()
    )
    epoch = np.array([source_tokens(corpus_dir, s.name, vocab_path) for s in sources])
    delivered, seen = [], np.zeros(len(sources), np.int64)
    while (seen < epoch).any():
        assert len(delivered) < MAX_EPOCH_STEPS, f"no full epoch in {MAX_EPOCH_STEPS} steps"
        delivered.append(next(batches))
        seen += np.bincount(delivered[-1]["source_id"], minlength=len(sources)) * dataset.seq_len
    return {
        f"delivered_{name}": np.stack([batch[name] for batch in delivered])
        for name in ("targets", "segment_ids", "source_id")
    }


def source_tokens(corpus_dir: str, source: str, vocab_path: str) -> int:
    """Tokens of a source's train split, one EOS per document included."""
    vocab = load_vocab(vocab_path)
    documents = read_documents(corpus_dir=corpus_dir, source=source, split="train")
    return sum(len(vocab.encode(text)) + 1 for text in documents)


def main() -> None:
    process_id, port, corpus_dir, small_corpus_dir, vocab_path, out_dir = sys.argv[1:]
    jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=int(process_id))
    np.savez(
        f"{out_dir}/process_{jax.process_index()}.npz",
        **assemble_and_resume(corpus_dir, vocab_path, out_dir),
        **deliver_an_epoch(small_corpus_dir, vocab_path),
    )
    jax.distributed.shutdown()


if __name__ == "__main__":
    main()
