"""Instruction examples: which raw fields make a (prompt, response) pair, checked record by record.

Instruction sets ship as JSONL whose field names differ (ours: prompt/response; Alpaca and
CodeAlpaca: instruction/input/output). ``InstructionFields`` maps one layout onto the pair that
`codemix ingest --instruction` writes as the "prompt" and "response" features. A bad record is an
error, not a skip: an instruction set is small and curated, and a record silently dropped or
trained with an empty response is a defect of the set that its owner must see.
"""

import dataclasses

from codemix_jax.data.ingest_readers import INVALID_UTF8, IngestError, Record

PROMPT = "prompt"
RESPONSE = "response"
PROMPT_IDS = "prompt_ids"  # int64 token ids without EOS, as `codemix ingest --vocab_path` writes
RESPONSE_IDS = "response_ids"
PROMPT_SEPARATOR = "\n\n"


@dataclasses.dataclass(frozen=True)
class InstructionFields:
    """Raw field names of one instruction-set layout.

    The prompt is the non-empty values of ``prompt`` joined by a blank line, so Alpaca's optional
    "input" drops out when empty: ``InstructionFields(prompt=("instruction", "input"),
    response="output")``. The prompt is used verbatim (a template, if any, is part of the data);
    prompt and response are tokenized separately, so the loss mask starts at a token boundary.
    """

    prompt: tuple[str, ...] = (PROMPT,)
    response: str = RESPONSE

    def __post_init__(self) -> None:
        names = [*self.prompt, self.response]
        if not self.prompt or not all(names) or len(set(names)) != len(names):
            raise ValueError(
                f"instruction fields must be distinct non-empty names with at least one prompt "
                f"field, got prompt={list(self.prompt)} response={self.response!r}"
            )

    @property
    def columns(self) -> tuple[str, ...]:
        return (*self.prompt, self.response)

    def pair(self, record: Record, path: str) -> tuple[str, str]:
        """The record's (prompt, response); IngestError naming file, line and field if unusable."""
        where = f"{path}, {record.where}"
        if record.problem:
            raise IngestError(f"{where}: {record.problem.replace('_', ' ')}")
        values = {field: self._text(record, field, where) for field in self.columns}
        prompt = PROMPT_SEPARATOR.join(values[f] for f in self.prompt if values[f].strip())
        if not prompt:
            raise IngestError(f"{where}: field(s) {list(self.prompt)} empty: no prompt")
        if not values[self.response].strip():
            raise IngestError(f"{where}: field {self.response!r} (the response) is empty")
        return prompt, values[self.response]

    @staticmethod
    def _text(record: Record, field: str, where: str) -> str:
        value = record.fields.get(field)
        if value is None:
            raise IngestError(f"{where}: field {field!r} is missing")
        if isinstance(value, bytes):  # Parquet binary columns
            try:
                value = value.decode("utf-8")
            except UnicodeDecodeError as error:
                raise IngestError(f"{where}: field {field!r}: {INVALID_UTF8}") from error
        if not isinstance(value, str):
            raise IngestError(
                f"{where}: field {field!r} must be a string, got {type(value).__name__}"
            )
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as error:  # lone surrogates from JSON's \ud800 escapes
            raise IngestError(f"{where}: field {field!r}: {INVALID_UTF8}") from error
        return value
