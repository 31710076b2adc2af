"""Paper A's eleven source names over the local demo corpus, for running paper A's arms tiny.

Stand-ins, not the paper's data: the names (and so every paper A mixture file) work unchanged,
and each name reads a real part of the local corpus. The corpus has Python code, Python's help
prose and package READMEs, so:

- ``text`` and ``high_quality`` both read the prose (the cooldown's up-weighted high-quality text
  is the same prose here);
- the ``code_<language>`` sources read disjoint subsets of the Python code shards, by the last
  digit of the shard index (all Python: languages differ in name only);
- ``synthetic_code`` reads the same shards as ``code_python`` (the paper's synthetic set is Python
  problems and solutions);
- ``markup`` and ``code_adjacent`` read alternate markup shards (READMEs stand in for commits,
  notebooks and Q&A threads).

Every code language needs at least one shard, so the code source needs six or more train shards
(`codemix build-corpus` writes seven); a language without shards is named when the run starts.
"""

from __future__ import annotations

import gin

from codemix_jax.data.sources import Source

# name -> (category, local source, last digits of the train shard indices it reads)
STAND_INS = {
    "text": ("text", "text", "0-9"),
    "code_python": ("code", "code", "06"),
    "code_java": ("code", "code", "17"),
    "code_javascript": ("code", "code", "28"),
    "code_cpp": ("code", "code", "39"),
    "code_go": ("code", "code", "4"),
    "code_other": ("code", "code", "5"),
    "markup": ("markup", "markup", "02468"),
    "code_adjacent": ("code_adjacent", "markup", "13579"),
    "synthetic_code": ("synthetic_code", "code", "06"),
    "high_quality": ("high_quality", "text", "0-9"),
}


@gin.configurable
def paper_a_local_sources(*, corpus_dir: str = "data/local/corpus") -> list[Source]:
    """Paper A's sources (gin/data/sources/paper_a.gin names) read from the local corpus."""
    return [
        Source(
            name=name,
            category=category,
            train=f"{corpus_dir}/{local}/train-????[{digits}]-of-*.tfrecord",
            validation=f"{corpus_dir}/{local}/validation-*-of-*.tfrecord",
            pretokenized=False,
        )
        for name, (category, local, digits) in STAND_INS.items()
    ]
