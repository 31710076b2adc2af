"""``export_hf``: a run's checkpoint as a Hugging Face model folder, written whole or not at all.

The folder is built in a temporary directory beside ``out`` and renamed into place at the end, so
a refused or failed export leaves no ``out``. Everything that can be refused (the step, the
architecture, the vocabulary, the saved arrays) is checked before the first array is read.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile

from codemix_jax.checkpoint import CheckpointMismatchError
from codemix_jax.export.architectures import Target, target_for
from codemix_jax.export.params import SavedParams
from codemix_jax.export.tokenizer import SpecialIds, write_tokenizer
from codemix_jax.export.writer import ShardedWriter
from codemix_jax.model import ModelConfig
from codemix_jax.trained import pick_step, run_vocab_path, saved_config, saved_run

log = logging.getLogger(__name__)

DEFAULT_MAX_SHARD_BYTES = 2 * 1024**3


def export_hf(
    *,
    run_dir: str,
    out: str,
    step: int | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> str:
    """Writes ``run_dir``'s checkpoint at ``step`` (default: the newest) to ``out`` as a folder
    transformers loads (``AutoModelForCausalLM`` and ``AutoTokenizer``); returns ``out``'s
    absolute path.

    Refused, before anything is written: an ``out`` that exists and is not an empty folder, a step
    that was not saved, a model no transformers architecture computes exactly, a vocabulary the
    tokenizer export does not reproduce. Weights are read a few arrays at a time and written in
    safetensors shards of at most ``max_shard_bytes``.
    """
    out = os.path.abspath(out)
    if os.path.lexists(out) and not (os.path.isdir(out) and not os.listdir(out)):
        raise FileExistsError(f"{out} exists: export to a new folder")
    run = saved_run(run_dir)
    step = pick_step(run, step)
    config = saved_config(run, step)
    target = target_for(config)
    vocab_path = run_vocab_path(run_dir)
    params = SavedParams(run, step, config)
    check_saved_paths(params, target)
    log.info("exporting %s step %d as %s to %s", run.directory, step, target.architecture, out)
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    building = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.partial-", dir=parent)
    try:
        ids = write_tokenizer(vocab_path, building, model_max_length=config.max_seq_len)
        check_vocab_size(config, ids, vocab_path)
        write_configs(building, config, target, ids)
        files = write_weights(building, params, target, max_shard_bytes)
        if os.path.isdir(out):
            os.rmdir(out)  # the empty folder the check allowed
        os.rename(building, out)
    except BaseException:
        shutil.rmtree(building, ignore_errors=True)
        raise
    log.info("wrote %s (%s)", out, ", ".join(files))
    return out


def check_saved_paths(params: SavedParams, target: Target) -> None:
    """Refuses a checkpoint whose params are not exactly those the target's rules read: a saved
    array left out would make the export another function."""
    saved, read = set(params.paths()), target.saved_paths(params.config)
    missing, unread = sorted(read - saved), sorted(saved - read)
    if missing or unread:
        raise CheckpointMismatchError(
            f"{params.directory} holds other params than its ModelConfig's {target.architecture} "
            f"export reads (missing: {missing[:5]}; not exported: {unread[:5]})"
        )


def check_vocab_size(config: ModelConfig, ids: SpecialIds, vocab_path: str) -> None:
    if ids.size > config.vocab_size:
        raise ValueError(
            f"{vocab_path} has {ids.size} pieces but the model only "
            f"vocab_size={config.vocab_size} embeddings"
        )


def write_configs(directory: str, config: ModelConfig, target: Target, ids: SpecialIds) -> None:
    """``config.json`` and ``generation_config.json``, written by transformers' own classes (so
    the installed version validates them)."""
    import transformers  # the export's optional dependency

    special = {
        "pad_token_id": _id(ids.pad),
        "eos_token_id": _id(ids.eos),
        "bos_token_id": _id(ids.bos),
    }
    config_class = getattr(transformers, target.config_class)
    hf_config = config_class(
        **target.config, **special, architectures=[target.architecture], dtype=config.param_dtype
    )
    hf_config.save_pretrained(directory)
    transformers.GenerationConfig(**special).save_pretrained(directory)


def _id(i: int) -> int | None:
    return i if i >= 0 else None


def write_weights(
    directory: str, params: SavedParams, target: Target, max_shard_bytes: int
) -> list[str]:
    """Each rule's tensors, reading its saved arrays once (all layers of a scanned source at
    once, else layer by layer) and dropping them once converted."""
    writer = ShardedWriter(directory, max_bytes=max_shard_bytes)
    for rule in target.rules:
        if rule.per_layer:
            for i, arrays in params.layers(rule.sources):
                writer.add(rule.name.format(i=i), rule.convert(*arrays))
        else:
            writer.add(rule.name, rule.convert(*params.read(rule.sources)))
    return writer.close()
