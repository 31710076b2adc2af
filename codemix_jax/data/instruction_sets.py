"""The local instruction sets: (prompt, response) examples made from files every Python install has.

- code: each module-level standard-library function (test suites excluded) with a docstring and
  at most ``_MAX_FUNCTION_CHARS`` characters; prompt = an instruction, its signature and
  docstring; response = its body, as written.
- text: the ``pydoc_data`` topics (the text corpus's prose); prompt = an instruction and a
  section's first paragraph, response = the section's title; or prompt = a paragraph, response =
  the prose paragraph that follows it in the same section.

Nothing is generated or paraphrased: every response is the install's own text, so the sets are
the same on every machine with the same Python. They are written as JSONL, the format real sets
(Alpaca-GPT4, CodeAlpaca, ...) ship in, and turned into shards by the same ``ingest`` code.
"""

import ast
import itertools
import json
import re
import sysconfig
from collections.abc import Iterable, Iterator
from pathlib import Path
from pydoc_data import topics

import tensorflow as tf

from codemix_jax.data.corpus import code_documents, name_hash
from codemix_jax.data.ingest import ingest
from codemix_jax.data.instructions import PROMPT, RESPONSE, InstructionFields

INSTRUCTION_SETS = ("text", "code")  # source names paper B's text:code schedules use
INSTRUCTION_GLOB = "{instructions_dir}/{name}/{split}-{name}-*.tfrecord"

_MAX_FUNCTION_CHARS = 1500  # at most a few hundred tokens: short enough to tune a tiny model on
_TEST_DIRS = frozenset({"test", "tests", "idle_test"})  # test suites: fixtures, not library code
_CODE_PROMPT = "Write the body of this function from Python's `{module}` module.\n\n{head}"
_TITLE_PROMPT = (
    "Give a title to this passage from the Python documentation.\n\n{paragraph}\n\nTitle:\n"
)
_CONTINUE_PROMPT = (
    "Continue this passage from the Python documentation with its next paragraph.\n\n"
    "{paragraph}\n\nNext paragraph:\n"
)
# A reST heading: a line underlined by one repeated punctuation character, as long as it.
_HEADING = re.compile(r"(?P<title>\S[^\n]*)\n(?P<rule>([*=\-~^])\3*)$")

Example = dict[str, str]  # {"id", "prompt", "response"}


def code_instructions(root: Path) -> Iterator[Example]:
    """Function-body examples from the ``.py`` files under ``root``, files in name-hash order."""
    documents = sorted(code_documents(root), key=lambda doc: (name_hash(doc[0]), doc[0]))
    for name, raw in documents:
        if _TEST_DIRS.intersection(Path(name).parts):
            continue
        try:
            source = raw.decode("utf-8")
            tree = ast.parse(source)
        except (UnicodeDecodeError, SyntaxError, ValueError):
            continue  # not Python 3 (test data, lib2to3 fixtures) or not UTF-8
        module = name.removesuffix(".py").removesuffix("/__init__").replace("/", ".")
        lines = source.splitlines(keepends=True)
        for node in tree.body:
            example = _function_example(node, lines, module)
            if example:
                yield example


def _function_example(node: ast.stmt, lines: list[str], module: str) -> Example | None:
    """Head (decorators, signature, docstring) as prompt, the rest as response, if it has both."""
    if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) or len(node.body) < 2:
        return None
    docstring, first = node.body[0], node.body[1]
    if ast.get_docstring(node) is None or first.lineno <= docstring.end_lineno:
        return None
    start = min([node.lineno, *(d.lineno for d in node.decorator_list)]) - 1
    head = "".join(lines[start : docstring.end_lineno])
    body = "".join(lines[docstring.end_lineno : node.end_lineno])
    if len(head) + len(body) > _MAX_FUNCTION_CHARS:
        return None
    return {
        "id": f"code:{module}.{node.name}",
        PROMPT: _CODE_PROMPT.format(module=module, head=head),
        RESPONSE: body,
    }


def text_instructions() -> Iterator[Example]:
    """Title and next-paragraph examples from every pydoc topic, topics in name-hash order."""
    for name in sorted(topics.topics, key=lambda topic: (name_hash(topic), topic)):
        for number, (title, blocks) in enumerate(_sections(topics.topics[name])):
            where = f"text:{name}#{number}"
            if blocks and blocks[0]:
                prompt = _TITLE_PROMPT.format(paragraph=blocks[0])
                yield {"id": f"{where}:title", PROMPT: prompt, RESPONSE: title}
            for index, (paragraph, following) in enumerate(itertools.pairwise(blocks)):
                if paragraph and following:
                    prompt = _CONTINUE_PROMPT.format(paragraph=paragraph)
                    yield {"id": f"{where}:next{index}", PROMPT: prompt, RESPONSE: following}


def _sections(text: str) -> Iterator[tuple[str, list[str | None]]]:
    """(title, blocks) of each headed section: a block is a prose paragraph with its lines joined,
    or None for anything else (indented code or grammar, lists of signatures), which no example
    uses."""
    title, blocks = None, []
    for block in re.split(r"\n[ \t]*\n", text.strip()):
        heading = _HEADING.fullmatch(block)
        if heading and len(heading["rule"]) >= len(heading["title"]):
            if title:
                yield title, blocks
            title, blocks = heading["title"].strip(), []
        else:
            paragraph = " ".join(line.strip() for line in block.splitlines())
            prose = not block[:1].isspace() and paragraph.endswith((".", "?", "!"))
            blocks.append(paragraph if prose else None)
    if title:
        yield title, blocks


def build_local_instructions(
    *,
    out_dir: str,
    max_examples_per_set: int | None = None,
    validation_fraction: float = 0.05,
    docs_per_shard: int = 256,
) -> dict[str, dict[str, int]]:
    """Writes ``{out_dir}/{text,code}.jsonl`` and their shards in ``{out_dir}/{text,code}/``.

    Returns {set: {split: examples}}. A previous build's shards are removed first.
    """
    if max_examples_per_set is not None and max_examples_per_set < 1:
        raise ValueError(f"max_examples_per_set must be >= 1 or None, got {max_examples_per_set}")
    examples = {
        "text": text_instructions(),
        "code": code_instructions(Path(sysconfig.get_paths()["stdlib"])),
    }
    counts = {}
    tf.io.gfile.makedirs(out_dir)
    for name in INSTRUCTION_SETS:
        jsonl = f"{out_dir}/{name}.jsonl"
        _write_jsonl(jsonl, examples[name], max_examples_per_set)
        shards = f"{out_dir}/{name}"
        if tf.io.gfile.exists(shards):
            tf.io.gfile.rmtree(shards)
        manifest = ingest(
            inputs=[jsonl],
            out_dir=shards,
            instruction=InstructionFields(),
            validation_fraction=validation_fraction,
            docs_per_shard=docs_per_shard,
            workers=1,
        )
        counts[name] = {split: n["docs"] for split, n in manifest["totals"]["splits"].items()}
        print(f"[build-instructions] {name}: {counts[name]} examples in {shards}", flush=True)
    return counts


def _write_jsonl(path: str, examples: Iterable[Example], limit: int | None) -> None:
    with tf.io.gfile.GFile(path, "w") as f:
        for count, example in enumerate(examples):
            if limit is not None and count >= limit:
                break
            f.write(json.dumps(example) + "\n")
