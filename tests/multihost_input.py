"""One process of test_multihost: read this host's input, assemble global batches, checkpoint
and resume the input, and save what it saw.

Run as ``python tests/multihost_input.py PROCESS_ID PORT CORPUS_DIR VOCAB_PATH OUT_DIR``; two such
processes form one JAX cluster on localhost (2 CPU devices each).
"""

import functools
import hashlib
import sys

import jax

jax.config.update("jax_num_cpu_devices", 2)

import numpy as np  # noqa: E402
import seqio  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402

from codemix_jax import sharding  # noqa: E402
from codemix_jax.checkpoint import Checkpoints  # noqa: E402
from codemix_jax.data import MixtureInput  # noqa: E402
from codemix_jax.data.sources import local_sources  # noqa: E402
from codemix_jax.train_state import global_batch  # noqa: E402

STEPS = 6
META = {"model_config": {"d_model": 8}}


def document_hashes(sources, vocab_path: str) -> dict[str, list[str]]:
    """Hashes of the raw documents this host's shard of each source holds (one pass)."""
    shard = seqio.ShardInfo(index=jax.process_index(), num_shards=jax.process_count())
    hashes = {}
    for source in sources:
        # The training Task's own data source and seqio's own sharding, minus the preprocessing.
        documents = seqio.Task(
            f"{source.name}_documents",
            source=source.task(vocab_path=vocab_path).source,
            output_features={},
            preprocessors=[],
        )
        records = documents.get_dataset(
            sequence_length=None, split="train", shuffle=False, shard_info=shard, num_epochs=1
        )
        hashes[source.name] = [
            hashlib.sha256(record[source.text_feature]).hexdigest()
            for record in records.as_numpy_iterator()
        ]
    return hashes


def main() -> None:
    process_id, port, corpus_dir, vocab_path, out_dir = sys.argv[1:]
    jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=int(process_id))
    mesh = sharding.make_mesh(data=1, fsdp=-1, tensor=1)
    sources = local_sources(corpus_dir=corpus_dir)
    dataset = MixtureInput(
        sources=sources,
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

    hashes = document_hashes(sources, vocab_path)
    np.savez(
        f"{out_dir}/process_{jax.process_index()}.npz",
        host_rows=np.stack(host_rows),
        global_rows=np.stack(global_rows),
        after_save=np.stack(after_save),
        after_restore=np.stack(after_restore),
        **{f"docs_{name}": np.array(values) for name, values in hashes.items()},
    )
    jax.distributed.shutdown()


if __name__ == "__main__":
    main()
