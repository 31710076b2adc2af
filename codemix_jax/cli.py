"""The ``codemix`` command: train, experiment, params, build-corpus, build-instructions,
train-vocab, ingest, mixture-report, aot, plan, sample, eval, export."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence

import gin
import jax

from codemix_jax import aot, distributed, experiment, gin_config, planner
from codemix_jax.data import MixtureInput, build_local_corpus, load_vocab, train_vocab
from codemix_jax.data.ingest import ingest
from codemix_jax.data.instruction_sets import build_local_instructions
from codemix_jax.data.instructions import PROMPT, RESPONSE, InstructionFields
from codemix_jax.data.report import mixture_report, report_json, report_table
from codemix_jax.eval import multiple_choice, runner
from codemix_jax.eval.lm_eval_tasks import write_lm_eval_tasks
from codemix_jax.eval.sampling import SamplingSettings, sampler_for
from codemix_jax.export import export_hf
from codemix_jax.launch import commands as launch_commands
from codemix_jax.launch import job as launch_job
from codemix_jax.model import ModelConfig, count_parameters
from codemix_jax.nonfinite import DivergedError
from codemix_jax.preemption import Preempted
from codemix_jax.tpu_topology import TPU_PLATFORM_GIN
from codemix_jax.train import train
from codemix_jax.trained import load_trained

log = logging.getLogger("codemix")

EXIT_DOES_NOT_FIT = 1  # `codemix plan`: a step needs more memory than a chip has
EXIT_DIVERGED = 3  # 0: done or stopped with a checkpoint; 2: bad input; 3: diverged; 4: job broken
# (a process of a multi-process job lost); 5: a step hung (watchdog)


def _add_gin_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--gin_file", action="append", required=True, help="gin file; repeat to compose"
    )
    parser.add_argument(
        "--gin_bindings",
        action="append",
        default=[],
        help="extra binding such as 'train.num_steps = 10'; repeatable, applied last",
    )


def _add_distributed_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--distributed",
        action="store_true",
        help="multi-host run on a TPU pod or a managed cluster (jax.distributed auto-detects it)",
    )
    parser.add_argument(
        "--coordinator_address", help="multi-process run elsewhere: process 0's host:port"
    )
    parser.add_argument("--num_processes", type=int, help="with --coordinator_address")
    parser.add_argument("--process_id", type=int, help="with --coordinator_address")
    parser.add_argument(
        "--distributed_timeout_s",
        type=int,
        default=300,
        help="exit (code 2, naming the coordinator) if the job is not joined within this long",
    )
    parser.add_argument(
        "--heartbeat_timeout_s",
        type=int,
        default=100,
        help="a process silent this long counts as dead and the job's others exit (code 4)",
    )


def _start_distributed(args: argparse.Namespace) -> None:
    """Join the job: at the given coordinator, or the one jax detects (TPU pods, SLURM, GKE)."""
    if args.coordinator_address or args.distributed:
        distributed.join(
            coordinator_address=args.coordinator_address,
            num_processes=args.num_processes,
            process_id=args.process_id,
            timeout_s=args.distributed_timeout_s,
            heartbeat_timeout_s=args.heartbeat_timeout_s,
        )


def _train(args: argparse.Namespace) -> None:
    _start_distributed(args)
    saved_step = [f"train.compiled_step = {args.compiled_step!r}"] if args.compiled_step else []
    gin_config.parse(args.gin_file, [*args.gin_bindings, *saved_step])
    metrics = train(run_dir=args.run_dir)
    log.info("done: %s", json.dumps(metrics))


def _experiment(args: argparse.Namespace) -> None:
    if not args.dry_run:
        _start_distributed(args)
    plan = experiment.plan_experiment(
        gin_files=args.gin_file, bindings=args.gin_bindings, root=args.root, scale=args.scale
    )
    print(experiment.format_plan(plan), flush=True)
    if not args.dry_run:
        experiment.run_experiment(plan, only=args.stage)


def _params(args: argparse.Namespace) -> None:
    gin_config.parse(args.gin_file, args.gin_bindings)
    counts = count_parameters(ModelConfig())
    if args.json:
        print(json.dumps(counts))
    else:
        for name, count in counts.items():
            print(f"{name:>14}: {count:,} ({count / 1e6:.1f}M)")


def _build_corpus(args: argparse.Namespace) -> None:
    build_local_corpus(out_dir=args.out_dir, max_bytes_per_source=args.max_bytes_per_source)


def _build_instructions(args: argparse.Namespace) -> None:
    build_local_instructions(out_dir=args.out_dir, max_examples_per_set=args.max_examples_per_set)


def _train_vocab(args: argparse.Namespace) -> None:
    train_vocab(corpus_dir=args.corpus_dir, out_path=args.out_path, vocab_size=args.vocab_size)


def _ingest(args: argparse.Namespace) -> None:
    ingest(
        inputs=args.input,
        out_dir=args.out_dir,
        text_field=args.text_field,
        meta_fields=tuple(field for field in args.meta_fields.split(",") if field),
        vocab_path=args.vocab_path,
        validation_fraction=args.validation_fraction,
        docs_per_shard=args.docs_per_shard,
        workers=args.workers,
        max_doc_chars=args.max_doc_chars,
        instruction=_instruction_fields(args),
    )


def _instruction_fields(args: argparse.Namespace) -> InstructionFields | None:
    if not args.instruction:
        if args.prompt_fields or args.response_field:
            raise ValueError("--prompt_fields and --response_field need --instruction")
        return None
    return InstructionFields(
        prompt=tuple((args.prompt_fields or PROMPT).split(",")),
        response=args.response_field or RESPONSE,
    )


def _mixture_report(args: argparse.Namespace) -> None:
    gin_config.parse(args.gin_file, args.gin_bindings)
    report = mixture_report(MixtureInput(), num_batches=args.batches, start_step=args.start_step)
    print(json.dumps(report_json(report)) if args.json else report_table(report))


def _aot(args: argparse.Namespace) -> None:
    report = aot.aot_compile(
        gin_files=args.gin_file,
        gin_bindings=args.gin_bindings,
        accelerator=args.topology,
        num_slices=args.num_slices,
        save_compiled=args.save_compiled or "",
    )
    print(json.dumps(report.as_json()) if args.json else aot.format_report(report))


def _plan(args: argparse.Namespace) -> int:
    plan = planner.plan_costs(
        experiments=[args.gin_file] if args.gin_file else [[arm] for arm in args.grid],
        bindings=args.gin_bindings,
        topology=args.topology,
        num_slices=args.num_slices,
        mfu=tuple(float(value) for value in args.mfu.split(",")),
        platform_gin="" if args.no_platform_gin else args.platform_gin,
        check_memory=not args.no_aot,
        scale=args.scale,
    )
    print(json.dumps(planner.costs_json(plan)) if args.json else planner.format_costs(plan))
    return 0 if plan.fits else EXIT_DOES_NOT_FIT


def _sample(args: argparse.Namespace) -> None:
    trained = load_trained(args.run_dir, step=args.step, vocab_path=args.vocab_path)
    settings = SamplingSettings(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
    )
    vocab = load_vocab(trained.vocab_path)
    print(sampler_for(trained).complete([args.prompt], settings, vocab)[0], flush=True)


def _eval(args: argparse.Namespace) -> None:
    run_dirs = args.run_dir or runner.stage_dirs(args.root)
    checkpoints = runner.checkpoints_to_evaluate(run_dirs, step=args.step, all_steps=args.all_steps)
    runner.evaluate(
        tasks=args.tasks(args),
        checkpoints=checkpoints,
        vocab_path=args.vocab_path,
        overwrite=args.overwrite,
    )


def _lm_eval_tasks(args: argparse.Namespace) -> None:
    files = [multiple_choice.task_path(name) for name in args.task or multiple_choice.shipped()]
    names = write_lm_eval_tasks(args.out, files)
    print(f"lm_eval --include_path {args.out} --tasks {','.join(names)}", flush=True)


def _export(args: argparse.Namespace) -> None:
    print(export_hf(run_dir=args.run_dir, out=args.out, step=args.step), flush=True)


def _add_checkpoint_flags(parser: argparse.ArgumentParser, *, many: bool) -> None:
    """Which checkpoint(s) to read: a run (and a step), or, with ``many``, runs or a root."""
    if many:
        where = parser.add_mutually_exclusive_group(required=True)
        where.add_argument("--run_dir", action="append", help="a run directory; repeatable")
        where.add_argument("--root", help="an experiment root: every stage folder under it")
        parser.add_argument(
            "--all_steps", action="store_true", help="every kept checkpoint, not only the newest"
        )
        parser.add_argument(
            "--overwrite", action="store_true", help="redo tasks that already have a record"
        )
    else:
        parser.add_argument("--run_dir", required=True, help="the run directory to read")
    parser.add_argument("--step", type=int, help="the checkpoint's step (default: the newest)")
    parser.add_argument(
        "--vocab_path", help="SentencePiece model (default: the one in the run's config.gin)"
    )


def _add_sampling_flags(
    parser: argparse.ArgumentParser, *, max_new_tokens: int, temperature: float | None = 0.0
) -> None:
    parser.add_argument("--max_new_tokens", type=int, default=max_new_tokens)
    default = "0 for one sample, 0.8 for several" if temperature is None else temperature
    parser.add_argument(
        "--temperature", type=float, default=temperature, help=f"0 = greedy (default {default})"
    )
    parser.add_argument("--top_p", type=float, default=1.0, help="nucleus mass; 1 = all tokens")
    parser.add_argument("--seed", type=int, default=0)


def _add_eval_commands(commands: argparse._SubParsersAction) -> None:
    eval_cmd = commands.add_parser(
        "eval", help="evaluate checkpoints; one JSON record per checkpoint and task"
    )
    kinds = eval_cmd.add_subparsers(dest="kind", required=True)
    mc_cmd = kinds.add_parser("mc", help="zero-shot multiple choice by log-likelihood")
    mc_cmd.add_argument(
        "--task",
        action="append",
        help="a JSONL task file, or a shipped task's name; repeatable (default: every shipped)",
    )
    _add_checkpoint_flags(mc_cmd, many=True)
    mc_cmd.set_defaults(run=_eval, tasks=runner.multiple_choice_tasks)

    humaneval_cmd = kinds.add_parser(
        "humaneval", help="HumanEval pass@k; generated code runs in a sandbox"
    )
    humaneval_cmd.add_argument("--n_samples", type=int, default=1, help="completions per problem")
    humaneval_cmd.add_argument(
        "--ks", default="1,10,100", help="pass@k for each k <= n_samples (comma-separated)"
    )
    humaneval_cmd.add_argument("--limit", type=int, help="only the first N problems")
    _add_checkpoint_flags(humaneval_cmd, many=True)
    _add_sampling_flags(humaneval_cmd, max_new_tokens=256, temperature=None)
    humaneval_cmd.set_defaults(run=_eval, tasks=runner.humaneval_tasks)

    lm_eval_cmd = kinds.add_parser(
        "lm-eval-tasks", help="write the multiple-choice tasks as lm-evaluation-harness tasks"
    )
    lm_eval_cmd.add_argument("--out", required=True, help="the folder for lm_eval --include_path")
    lm_eval_cmd.add_argument("--task", action="append", help="as for `eval mc`")
    lm_eval_cmd.set_defaults(run=_lm_eval_tasks)


def _add_launch_commands(commands: argparse._SubParsersAction) -> None:
    launch_cmd = commands.add_parser(
        "launch", help="run train/experiment on a TPU slice: gcloud TPU VM, queued resource, xpk"
    )
    verbs = launch_cmd.add_subparsers(dest="verb", required=True)
    create = verbs.add_parser(
        "create", help="check the job on the slice, make the slice, ship the commit, start"
    )
    create.add_argument("--backend", required=True, choices=launch_job.BACKENDS)
    create.add_argument("--accelerator", required=True, help="e.g. v5e-256, v5p-512, v6e-64")
    create.add_argument("--num_slices", type=int, default=1, help="slices over DCN")
    create.add_argument(
        "--zone", required=True, help="checked against the table in codemix_jax/launch/zones.py"
    )
    create.add_argument("--allow_unlisted_zone", action="store_true", help="a zone newer than it")
    create.add_argument("--project", help="Google Cloud project (default: gcloud's)")
    create.add_argument("--provisioning", choices=launch_job.PROVISIONING, default="on-demand")
    _add_gin_flags(create)
    job = create.add_mutually_exclusive_group(required=True)
    job.add_argument("--run_dir", help="run `codemix train` into this gs:// run dir")
    job.add_argument("--root", help="run `codemix experiment` (the arm) under this gs:// root")
    create.add_argument("--scale", default="full", help="experiment: the arm's scale")
    create.add_argument("--stage", help="experiment: only this stage")
    create.add_argument(
        "--no_platform_gin", action="store_true", help=f"leave {TPU_PLATFORM_GIN} out"
    )
    create.add_argument("--runtime_version", help="TPU VM software (default: per generation)")
    create.add_argument("--cluster", help="xpk: the team's GKE cluster")
    create.add_argument("--image", help="xpk: image repository; tagged with the commit")
    create.add_argument(
        "--max_restarts",
        type=int,
        default=10,
        help="restarts after a failure (xpk, SkyPilot) or a broken job (watch)",
    )
    create.add_argument("--allow_dirty", action="store_true", help="ship HEAD despite changes")
    create.set_defaults(run=launch_commands.create)
    for name, run, help_text in (
        ("status", launch_commands.status, "the slice's state, the command's, restarts"),
        ("logs", launch_commands.logs, "tail the command's log (worker 0, or --worker all)"),
        ("stop", launch_commands.stop, "stop the command (it saves a checkpoint); slice stays"),
        ("delete", launch_commands.delete, "delete the slice, queued request or workload"),
        ("watch", launch_commands.watch, "poll; re-create after a preemption, resume"),
    ):
        verbs.add_parser(name, help=help_text).set_defaults(run=run)
    for name, verb in verbs.choices.items():
        verb.add_argument("--name", required=True, help="the launch (a TPU or workload name)")
        verb.add_argument("--launch_dir", default=launch_job.DEFAULT_LAUNCH_DIR, help="records")
        if name != "watch":  # watch acts on what it sees; a dry run sees nothing
            verb.add_argument("--dry_run", action="store_true", help="print commands, run none")
    verbs.choices["logs"].add_argument("--worker", default="0", help="a worker number, or all")
    verbs.choices["logs"].add_argument("--no_follow", action="store_true")
    verbs.choices["watch"].add_argument("--poll_s", type=float, default=60, help="seconds")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="codemix", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    train_cmd = commands.add_parser("train", help="train a model from gin files")
    _add_gin_flags(train_cmd)
    train_cmd.add_argument(
        "--run_dir", required=True, help="metrics, TensorBoard, config.gin, checkpoints"
    )
    _add_distributed_flags(train_cmd)
    train_cmd.add_argument(
        "--compiled_step", help="run the step `codemix aot --save_compiled` wrote, not compiling"
    )
    train_cmd.set_defaults(run=_train)

    experiment_cmd = commands.add_parser(
        "experiment", help="run an arm's stages in order (rerun to continue after a stop)"
    )
    _add_gin_flags(experiment_cmd)
    experiment_cmd.add_argument("--root", required=True, help="each stage runs in ROOT/<stage>")
    experiment_cmd.add_argument(
        "--scale", default="full", help="'full' (as written) or a scale the arm names, e.g. tiny"
    )
    experiment_cmd.add_argument("--stage", help="run only this stage (its init must be finished)")
    experiment_cmd.add_argument(
        "--dry_run", action="store_true", help="print the plan; train and write nothing"
    )
    _add_distributed_flags(experiment_cmd)
    experiment_cmd.set_defaults(run=_experiment)

    params_cmd = commands.add_parser("params", help="count a gin model's parameters abstractly")
    _add_gin_flags(params_cmd)
    params_cmd.add_argument("--json", action="store_true", help="print one JSON object")
    params_cmd.set_defaults(run=_params)

    corpus_cmd = commands.add_parser(
        "build-corpus", help="build the local code/text/markup corpus from this Python install"
    )
    corpus_cmd.add_argument("--out_dir", default="data/local/corpus")
    corpus_cmd.add_argument(
        "--max_bytes_per_source", type=int, default=None, help="cap per source (default: all)"
    )
    corpus_cmd.set_defaults(run=_build_corpus)

    instructions_cmd = commands.add_parser(
        "build-instructions",
        help="build the local text and code instruction sets (JSONL and shards) from this Python",
    )
    instructions_cmd.add_argument("--out_dir", default="data/local/instructions")
    instructions_cmd.add_argument(
        "--max_examples_per_set", type=int, default=None, help="cap per set (default: all)"
    )
    instructions_cmd.set_defaults(run=_build_instructions)

    vocab_cmd = commands.add_parser("train-vocab", help="train the SentencePiece vocabulary")
    vocab_cmd.add_argument("--corpus_dir", default="data/local/corpus")
    vocab_cmd.add_argument("--out_path", default="data/local/spm.model")
    vocab_cmd.add_argument("--vocab_size", type=int, default=2048)
    vocab_cmd.set_defaults(run=_train_vocab)

    ingest_cmd = commands.add_parser(
        "ingest", help="raw JSONL / JSONL.zst / Parquet dumps -> TFRecord shards (resumable)"
    )
    ingest_cmd.add_argument(
        "--input", action="append", required=True, help="file glob, local or gs://; repeatable"
    )
    ingest_cmd.add_argument("--out_dir", required=True, help="shards, manifest, .done markers")
    ingest_cmd.add_argument("--text_field", default="text", help="the field holding the document")
    ingest_cmd.add_argument(
        "--meta_fields", default="", help="comma-separated fields copied as bytes features"
    )
    ingest_cmd.add_argument(
        "--vocab_path", default=None, help="SentencePiece model: also store 'targets' ids (no EOS)"
    )
    ingest_cmd.add_argument("--validation_fraction", type=float, default=0.001)
    ingest_cmd.add_argument("--docs_per_shard", type=int, default=10_000)
    ingest_cmd.add_argument(
        "--workers", type=int, default=None, help="processes (default: min(CPUs, input files))"
    )
    ingest_cmd.add_argument(
        "--max_doc_chars",
        type=int,
        default=1_000_000,
        help="skip (and count) longer documents; not truncated, since a cut-off file or page "
        "teaches a broken document; 0 = no limit",
    )
    ingest_cmd.add_argument(
        "--instruction",
        action="store_true",
        help="records are (prompt, response) instruction examples: any bad record stops the "
        "ingest before the output is touched",
    )
    ingest_cmd.add_argument(
        "--prompt_fields",
        help="with --instruction: comma-separated fields whose non-empty values, joined by a blank "
        "line, make the prompt (default: prompt; Alpaca, CodeAlpaca: instruction,input)",
    )
    ingest_cmd.add_argument(
        "--response_field",
        help="with --instruction: the response's field (default: response; Alpaca: output)",
    )
    ingest_cmd.set_defaults(run=_ingest)

    aot_cmd = commands.add_parser(
        "aot", help="compile the train step for a TPU slice on this host: per-chip memory, fits?"
    )
    _add_gin_flags(aot_cmd)
    aot_cmd.add_argument(
        "--topology",
        required=True,
        help="TPU slice, e.g. v5e-256, v5p-512; or 'local' for this host's devices",
    )
    aot_cmd.add_argument("--num_slices", type=int, default=1, help="slices over DCN")
    aot_cmd.add_argument("--json", action="store_true", help="print one JSON object")
    aot_cmd.add_argument(
        "--save_compiled", help="write the compiled step here, for `codemix train --compiled_step`"
    )
    aot_cmd.set_defaults(run=_aot)

    plan_cmd = commands.add_parser(
        "plan", help="an experiment's steps, hours and chip-hours on a TPU slice, and fits or not"
    )
    arms = plan_cmd.add_mutually_exclusive_group(required=True)
    arms.add_argument("--gin_file", action="append", help="an arm's gin file; repeat to compose")
    arms.add_argument("--grid", nargs="+", metavar="ARM", help="several arms, summed")
    plan_cmd.add_argument("--gin_bindings", action="append", default=[], help="for every arm")
    plan_cmd.add_argument("--topology", required=True, help="TPU slice, e.g. v5e-256")
    plan_cmd.add_argument("--num_slices", type=int, default=1, help="slices over DCN")
    plan_cmd.add_argument("--mfu", default="0.3,0.6", help="assumed MFU: 'low,high' or one value")
    plan_cmd.add_argument(
        "--platform_gin",
        default=TPU_PLATFORM_GIN,
        help="parsed after each arm's files (default: the TPU kernels)",
    )
    plan_cmd.add_argument(
        "--no_platform_gin", action="store_true", help="plan without it (as codemix launch)"
    )
    plan_cmd.add_argument("--no_aot", action="store_true", help="skip the memory verdict")
    plan_cmd.add_argument("--scale", default="full", help="'full' or a scale the arms name")
    plan_cmd.add_argument("--json", action="store_true", help="print one JSON object")
    plan_cmd.set_defaults(run=_plan)

    report_cmd = commands.add_parser(
        "mixture-report", help="token shares a gin mixture delivers vs. the configured ones"
    )
    _add_gin_flags(report_cmd)
    report_cmd.add_argument("--batches", type=int, required=True, help="host batches to count")
    report_cmd.add_argument(
        "--start_step", type=int, default=0, help="first batch counted (earlier ones are read)"
    )
    report_cmd.add_argument("--json", action="store_true", help="print one JSON object")
    report_cmd.set_defaults(run=_mixture_report)

    sample_cmd = commands.add_parser("sample", help="complete a prompt with a trained checkpoint")
    _add_checkpoint_flags(sample_cmd, many=False)
    sample_cmd.add_argument("--prompt", required=True, help="the text to continue")
    _add_sampling_flags(sample_cmd, max_new_tokens=64)
    sample_cmd.set_defaults(run=_sample)

    _add_eval_commands(commands)
    _add_launch_commands(commands)

    export_cmd = commands.add_parser(
        "export", help="a checkpoint as a Hugging Face model folder (safetensors + tokenizer)"
    )
    export_cmd.add_argument("--run_dir", required=True, help="the run directory to read")
    export_cmd.add_argument("--step", type=int, help="the checkpoint's step (default: the newest)")
    export_cmd.add_argument(
        "--out", required=True, help="a new folder; written whole or not at all"
    )
    export_cmd.set_defaults(run=_export)
    return parser


def _configure_logging() -> None:
    """One format, with the time, for every Python log line and warning, the libraries' too."""
    # Importing TF, orbax or absl may already have given the root logger a handler in another
    # format, and TF gives its logger one of its own: every plain stream handler goes, for ours.
    for logger in [logging.root, *logging.root.manager.loggerDict.values()]:
        for handler in list(getattr(logger, "handlers", [])):  # placeholders have none
            if type(handler) is logging.StreamHandler:
                logger.removeHandler(handler)
    logging.basicConfig(format=distributed.log_format())
    logging.getLogger().setLevel(logging.INFO)
    logging.captureWarnings(True)
    logging.getLogger("absl").setLevel(logging.WARNING)  # orbax/seqio chatter at every save


def main(argv: Sequence[str] | None = None) -> int:
    _configure_logging()
    args = build_parser().parse_args(argv)
    try:
        status = args.run(args)
    except Preempted as stop:  # asked to stop, saved: a rerun of the same command resumes
        log.warning("%s", _message(stop))
        return 0
    except (FileNotFoundError, FileExistsError, ValueError) as error:
        # Bad input (gin, mesh, data, checkpoint, ingest errors all derive from these): the
        # message names the bad value; the traceback is only noise for the user.
        log.error("%s", _message(error))
        return 2
    except DivergedError as error:
        log.error("%s", _message(error))
        return EXIT_DIVERGED
    except jax.errors.JaxRuntimeError as error:
        if jax.distributed.is_initialized():  # a peer gone: leave now, not after jax's shutdown
            distributed.leave_broken_job(error)
        raise
    finally:
        gin.clear_config()
    return status or 0


def _message(error: Exception) -> str:
    """The error's own message, less the "In call to configurable ..." line gin appends."""
    return str(error).split(GIN_CALL_NOTE)[0]


GIN_CALL_NOTE = "\n  In call to configurable"


if __name__ == "__main__":
    sys.exit(main())
