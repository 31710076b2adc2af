"""Log-likelihood multiple choice, evaluation records, `codemix eval` and `codemix sample` on a
real trained run."""

import json
import logging
import os
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from codemix_jax import cli
from codemix_jax.data import load_vocab
from codemix_jax.eval import humaneval, multiple_choice, records
from codemix_jax.eval.loglikelihood import LoglikelihoodScorer, split_pair
from codemix_jax.eval.sampling import SamplingSettings, sampler_for
from codemix_jax.trained import TrainedModelError, load_trained, run_vocab_path

SHIPPED = ("arithmetic", "code_output", "commonsense")


@pytest.fixture(scope="module")
def trained(trained_run):
    return load_trained(trained_run, step=8)


def reference_loglikelihood(trained, context: list[int], continuation: list[int]) -> float:
    """log p(continuation | context) from one unpadded row, float64 log-softmax in numpy."""
    tokens = jnp.asarray([context + continuation])
    logits = jax.jit(trained.model.apply)(
        {"params": trained.params},
        tokens[:, :-1],
        segment_ids=jnp.ones_like(tokens[:, :-1]),
        positions=jnp.arange(tokens.shape[1] - 1)[None],
    )
    logits = np.asarray(logits[0], np.float64)
    top = logits.max(-1, keepdims=True)
    logprobs = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
    targets = np.asarray(tokens[0, 1:])
    picked = logprobs[np.arange(len(targets)), targets]
    return float(picked[-len(continuation) :].sum())


def test_batched_scores_equal_one_row_at_a_time(trained):
    """Every choice of a shipped task, scored in padded batches, equals its own unpadded row."""
    vocab = load_vocab(trained.vocab_path)
    items = multiple_choice.read_task(multiple_choice.task_path("commonsense"))[:2]
    scorer = LoglikelihoodScorer(
        model=trained.model, params=trained.params, mesh=trained.mesh, rules=trained.rules, rows=5
    )
    got = multiple_choice.choice_loglikelihoods(items, scorer=scorer, vocab=vocab)
    for item, scores in zip(items, got, strict=True):
        for choice, score in zip(item.choices, scores, strict=True):
            context, continuation = split_pair(vocab, item.context, choice)
            expected = reference_loglikelihood(trained, context, continuation)
            assert score == pytest.approx(expected, abs=1e-4)


def test_split_pair_moves_trailing_whitespace_and_keeps_the_whole_encoding(trained):
    vocab = load_vocab(trained.vocab_path)
    context, continuation = split_pair(vocab, "The answer is ", "forty-two")
    assert context == vocab.encode("The answer is")
    assert context + continuation == vocab.encode("The answer is forty-two")


def test_a_long_pair_keeps_its_end(trained):
    """Past max_seq_len + 1 tokens the context loses its beginning, as lm-eval truncates."""
    scorer = LoglikelihoodScorer(
        model=trained.model, params=trained.params, mesh=trained.mesh, rules=trained.rules
    )
    context = list(range(3, 3 + 200))
    continuation = [40, 41]
    kept = (context + continuation)[-129:]
    long, short = scorer.loglikelihoods([(context, continuation), (kept[:-2], continuation)])
    assert long == pytest.approx(short, abs=1e-5)


def test_accuracy_raw_and_length_normalised():
    items = [
        multiple_choice.Item("q", ("a", "bbbb"), answer=1),
        multiple_choice.Item("q", ("a", "bb"), answer=0),
    ]
    # Item 0: raw prefers "a" (-2 > -4); per character "bbbb" (-1 > -2). Item 1: both prefer "a".
    scores = [[-2.0, -4.0], [-1.0, -3.0]]
    assert multiple_choice.accuracy(items, scores) == {"acc": 0.5, "acc_norm": 1.0}


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("not json", ":2: not JSON"),
        ('["a"]', ":2: expected an object"),
        ('{"choices": ["a", "b"], "answer": 0}', ":2: 'context' must be a non-empty string"),
        ('{"context": "c", "choices": "ab", "answer": 0}', ":2: 'choices' must be a list"),
        ('{"context": "c", "choices": ["a", ""], "answer": 0}', ":2: 'choices' must be a list"),
        ('{"context": "c", "choices": ["a", "b"], "answer": 2}', ":2: 'answer' must index"),
        ('{"context": "c", "choices": ["a", "b"], "answer": true}', ":2: 'answer' must index"),
    ],
)
def test_a_bad_task_row_is_named_with_its_line(tmp_path, line, message):
    path = tmp_path / "task.jsonl"
    path.write_text('{"context": "c", "choices": ["a", "b"], "answer": 0}\n' + line + "\n")
    with pytest.raises(multiple_choice.TaskFileError, match=message):
        multiple_choice.read_task(str(path))


def test_an_unknown_task_lists_the_shipped_ones():
    with pytest.raises(multiple_choice.TaskFileError, match="shipped tasks: \\['arithmetic'"):
        multiple_choice.task_path("hellaswag")


def test_shipped_tasks_read():
    for name in SHIPPED:
        assert len(multiple_choice.read_task(multiple_choice.task_path(name))) >= 12


def eval_mc(*args: str) -> int:
    return cli.main(["eval", "mc", *args])


def test_eval_mc_writes_a_record_per_checkpoint_and_task_then_skips_them(
    trained_run, tmp_path, caplog
):
    run_dir = str(tmp_path / "run")
    shutil.copytree(trained_run, run_dir)
    assert eval_mc("--run_dir", run_dir, "--all_steps", "--task", "arithmetic") == 0
    found = records.read_records(run_dir)
    assert [(r["step"], r["metric"]) for r in found] == [
        (4, "acc"),
        (4, "acc_norm"),
        (8, "acc"),
        (8, "acc_norm"),
    ]
    for record in found:
        assert record["run"] == os.path.abspath(run_dir)
        assert record["stage"] == "run"
        assert record["task"] == "mc_arithmetic"
        assert record["n"] == 20
        assert record["tokens_seen"] == record["step"] * 8 * 128
        assert 0.0 <= record["value"] <= 1.0
    details_path = records.record_path(run_dir, 8, "mc_arithmetic").replace(".json", ".details")
    with open(details_path + ".json") as f:
        details = json.load(f)
    assert len(details["loglikelihoods"]) == 20
    # The record's accuracy is the accuracy of its own saved scores.
    items = multiple_choice.read_task(multiple_choice.task_path("arithmetic"))
    expected = multiple_choice.accuracy(items, details["loglikelihoods"])
    assert {r["metric"]: r["value"] for r in found if r["step"] == 8} == expected

    written = os.path.getmtime(records.record_path(run_dir, 8, "mc_arithmetic"))
    with caplog.at_level(logging.INFO):
        assert eval_mc("--run_dir", run_dir, "--all_steps", "--task", "arithmetic") == 0
    assert caplog.text.count("every task already has a record") == 2
    assert os.path.getmtime(records.record_path(run_dir, 8, "mc_arithmetic")) == written


def test_eval_over_an_experiment_root_reads_every_stage(trained_run, tmp_path):
    root = tmp_path / "root"
    for stage in ("pretrain", "cooldown"):
        shutil.copytree(trained_run, root / stage)
    (root / "notes").mkdir()  # not a run: ignored
    assert eval_mc("--root", str(root), "--task", "commonsense") == 0
    for stage in ("pretrain", "cooldown"):
        found = records.read_records(str(root / stage))
        assert {(r["stage"], r["step"], r["task"]) for r in found} == {(stage, 8, "mc_commonsense")}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--step", "6"], "has no checkpoint at step 6; it has \\[4, 8\\]"),
        (["--task", "nope.jsonl"], "task file 'nope.jsonl' not found"),
    ],
)
def test_eval_bad_input_is_named(trained_run, caplog, args, message):
    with caplog.at_level(logging.ERROR):
        assert eval_mc("--run_dir", trained_run, *args) == 2
    assert re.search(message, caplog.text), caplog.text


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--n_samples", "0"], "--n_samples=0 must be >= 1"),
        (["--ks", "1,0"], "--ks=1,0: each k must be >= 1"),
        (["--limit", "0"], "--limit=0 must be >= 1"),
        (["--temperature", "-1"], "temperature=-1.0 must be >= 0"),
        (["--max_new_tokens", "128"], "max_new_tokens=128 leaves no room for a prompt"),
    ],
)
def test_eval_humaneval_bad_settings_are_named(trained_run, tmp_path, caplog, flags, message):
    run_dir = str(tmp_path / "run")
    shutil.copytree(trained_run, run_dir)
    with caplog.at_level(logging.ERROR):
        assert cli.main(["eval", "humaneval", "--run_dir", run_dir, *flags]) == 2
    assert message in caplog.text
    assert records.read_records(run_dir) == []


def test_a_folder_without_checkpoints_is_refused(tmp_path):
    with pytest.raises(TrainedModelError, match="has no checkpoints/ folder"):
        load_trained(str(tmp_path))


def test_codemix_sample_prints_the_greedy_completion(trained_run, trained, capsys):
    prompt = "def add(a, b):\n    return"
    assert (
        cli.main(["sample", "--run_dir", trained_run, "--prompt", prompt, "--max_new_tokens", "12"])
        == 0
    )
    printed = capsys.readouterr().out
    vocab = load_vocab(trained.vocab_path)
    expected = sampler_for(trained).complete([prompt], SamplingSettings(max_new_tokens=12), vocab)
    assert printed == expected[0] + "\n"
    assert expected[0]


def test_eval_humaneval_records_pass_at_1_of_the_greedy_completions(trained_run, trained, tmp_path):
    """Three problems, greedy: the record holds pass@1 over 3, and its details the model's own
    completions cut at the stop sequences, each run in the sandbox."""
    run_dir = str(tmp_path / "run")
    shutil.copytree(trained_run, run_dir)
    flags = ["--run_dir", run_dir, "--step", "8", "--limit", "3", "--max_new_tokens", "24"]
    assert cli.main(["eval", "humaneval", *flags]) == 0
    (record,) = records.read_records(run_dir)
    assert (record["task"], record["metric"], record["n"]) == ("humaneval_first3", "pass@1", 3)
    with open(
        records.record_path(run_dir, 8, "humaneval_first3").replace(".json", ".details.json")
    ) as f:
        problems = json.load(f)["problems"]
    prompts = [problem["prompt"] for problem in humaneval.load_problems(3)]
    vocab = load_vocab(trained.vocab_path)
    raw = sampler_for(trained).complete(prompts, SamplingSettings(max_new_tokens=24), vocab)
    assert [p["samples"][0]["completion"] for p in problems] == [humaneval.truncate(r) for r in raw]
    statuses = {p["samples"][0]["status"] for p in problems}
    assert statuses <= {"passed", "failed", "timeout"}
    passed = sum(p["correct"] for p in problems)
    assert record["value"] == pytest.approx(passed / 3)


GENERATE_PROMPTS = [
    "def add(a, b):\n    return",
    "import os\n\n\nclass Config:\n\tdef __init__(self):",
    "The history of the city begins",
    "Größe — naïve café: 東京",
]


def test_greedy_sample_equals_greedy_generate_of_the_transformers_export(
    trained_run, exported_run, capsys
):
    """`codemix sample` and transformers' `generate` on the exported folder, both greedy from the
    same prompts: the same new tokens, and the same text printed."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(exported_run, local_files_only=True)
    hf_model = AutoModelForCausalLM.from_pretrained(
        exported_run, local_files_only=True, dtype=torch.float32
    )
    for prompt in GENERATE_PROMPTS:
        flags = ["--prompt", prompt, "--max_new_tokens", "20", "--step", "8"]
        assert cli.main(["sample", "--run_dir", trained_run, *flags]) == 0
        printed = capsys.readouterr().out.removesuffix("\n")
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            out = hf_model.generate(ids, max_new_tokens=20, do_sample=False)
        new = out[0, ids.shape[1] :].tolist()
        assert printed == tokenizer.decode(new, skip_special_tokens=True), prompt
        assert len(new) == 20 or new[-1] == 1  # full length, or stopped at EOS


def test_the_vocabulary_is_read_from_a_config_gin_that_wraps_a_long_path(tmp_path):
    """gin writes a long value on a line of its own after a backslash."""
    long_path = str(tmp_path / ("deep" * 20) / "spm.model")
    os.makedirs(os.path.dirname(long_path))
    open(long_path, "w").close()
    config = tmp_path / "run" / "config.gin"
    config.parent.mkdir()
    config.write_text(f"train.num_steps = 4\nMixtureInput.vocab_path = \\\n    '{long_path}'\n")
    assert run_vocab_path(str(config.parent)) == long_path
