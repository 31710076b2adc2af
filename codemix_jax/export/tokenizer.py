"""The run's SentencePiece vocabulary as a tokenizer transformers loads, giving the same ids.

SentencePiece's BPE merges, at each step, the adjacent pair whose concatenation is the
best-scored piece (ties: the leftmost). A ``tokenizers`` BPE model whose merges are every split
of every piece into two pieces, ranked by the piece's score, makes the same choices; spaces become
``▁`` first, as SentencePiece's whitespace escaping does (the vocabulary keeps every other
character as it is: identity normalisation, no dummy prefix), and characters outside the pieces
fall back to byte pieces in both. No BOS or EOS is added, as ``seqio``'s ``encode`` adds none, and
the special tokens' text (``</s>``) is encoded as text, as SentencePiece does. Vocabularies
trained otherwise are refused by setting. ``tokenizer.model`` is the SentencePiece file itself,
for readers that load it directly.
"""

from __future__ import annotations

import dataclasses
import os

import tensorflow as tf
from sentencepiece import sentencepiece_model_pb2
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers

Piece = sentencepiece_model_pb2.ModelProto.SentencePiece
SPACE = "\u2581"  # SentencePiece's escaped space
SENTENCEPIECE_FILE = "tokenizer.model"


class UnsupportedVocabularyError(ValueError):
    """A SentencePiece model trained with settings the exported tokenizer would not reproduce."""


@dataclasses.dataclass(frozen=True)
class SpecialIds:
    """The vocabulary's special ids; a negative id is absent (SentencePiece's convention)."""

    pad: int
    eos: int
    unk: int
    bos: int
    size: int  # the number of pieces


def write_tokenizer(vocab_path: str, directory: str, *, model_max_length: int) -> SpecialIds:
    """Writes ``tokenizer.json``, ``tokenizer_config.json`` and ``tokenizer.model`` for the
    SentencePiece model at ``vocab_path``; returns its special ids."""
    with tf.io.gfile.GFile(vocab_path, "rb") as f:
        serialized = f.read()
    proto = sentencepiece_model_pb2.ModelProto.FromString(serialized)
    check_settings(proto, vocab_path)
    spec = proto.trainer_spec
    ids = SpecialIds(
        pad=spec.pad_id, eos=spec.eos_id, unk=spec.unk_id, bos=spec.bos_id, size=len(proto.pieces)
    )
    _hf_tokenizer(proto, ids, model_max_length).save_pretrained(directory)
    with open(os.path.join(directory, SENTENCEPIECE_FILE), "wb") as f:
        f.write(serialized)
    return ids


def check_settings(proto: sentencepiece_model_pb2.ModelProto, vocab_path: str) -> None:
    """Refuses, naming each, the settings under which the BPE export would give other ids."""
    normalizer, spec = proto.normalizer_spec, proto.trainer_spec
    found = []
    if spec.model_type != spec.BPE:
        found.append(f"model_type={spec.ModelType.Name(spec.model_type)} (needs BPE)")
    if normalizer.precompiled_charsmap or normalizer.name not in ("identity", ""):
        found.append(f"normalization_rule_name={normalizer.name!r} (needs 'identity')")
    if normalizer.add_dummy_prefix:
        found.append("add_dummy_prefix=True")
    if normalizer.remove_extra_whitespaces:
        found.append("remove_extra_whitespaces=True")
    if not normalizer.escape_whitespaces:
        found.append("escape_whitespaces=False")
    if not spec.byte_fallback:
        found.append("byte_fallback=False")
    if spec.treat_whitespace_as_suffix:
        found.append("treat_whitespace_as_suffix=True")
    if kinds := sorted({Piece.Type.Name(p.type) for p in proto.pieces if p.type in _UNHANDLED}):
        found.append(f"pieces of type {', '.join(kinds)}")
    if found:
        raise UnsupportedVocabularyError(
            f"{vocab_path}: the tokenizer export reproduces SentencePiece's ids only for the "
            f"project's vocabulary settings; this one has {', '.join(found)}"
        )


_UNHANDLED = (Piece.USER_DEFINED, Piece.UNUSED)


def _hf_tokenizer(
    proto: sentencepiece_model_pb2.ModelProto, ids: SpecialIds, model_max_length: int
) -> object:
    """The transformers tokenizer over a ``tokenizers`` BPE model built from the pieces."""
    from transformers import TokenizersBackend  # the export's optional dependency

    pieces = proto.pieces
    vocab = {piece.piece: i for i, piece in enumerate(pieces)}
    bpe = models.BPE(
        vocab=vocab,
        merges=_merges(proto),
        unk_token=pieces[ids.unk].piece,
        byte_fallback=True,
    )
    tokenizer = Tokenizer(bpe)
    tokenizer.normalizer = normalizers.Replace(" ", SPACE)
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    )
    special = [i for i, p in enumerate(pieces) if p.type in (Piece.CONTROL, Piece.UNKNOWN)]
    tokenizer.add_special_tokens(
        [AddedToken(pieces[i].piece, special=True, normalized=False) for i in special]
    )

    def token(i: int) -> str | None:
        return pieces[i].piece if i >= 0 else None

    return TokenizersBackend(
        tokenizer_object=tokenizer,
        pad_token=token(ids.pad),
        eos_token=token(ids.eos),
        unk_token=token(ids.unk),
        bos_token=token(ids.bos),
        add_bos_token=False,
        add_eos_token=False,
        # Text that reads like a special token is text, as SentencePiece encodes it.
        split_special_tokens=True,
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
    )


def _merges(proto: sentencepiece_model_pb2.ModelProto) -> list[tuple[str, str]]:
    """Every split of a normal piece into two normal pieces, the best-scored piece's first."""
    normal = {p.piece for p in proto.pieces if p.type == Piece.NORMAL}
    ranked = sorted(
        (-piece.score, i, k, piece.piece)
        for i, piece in enumerate(proto.pieces)
        if piece.type == Piece.NORMAL
        for k in range(1, len(piece.piece))
    )
    return [
        (text[:k], text[k:])
        for _, _, k, text in ranked
        if text[:k] in normal and text[k:] in normal
    ]
