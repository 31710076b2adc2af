"""Time MaxText's own jitted train step for the benchmark model; one JSON line on stdout.

Runs inside the MaxText venv that ``bench/maxtext_compare.py`` builds (Python >= 3.12), never in
codemix's. MaxText is imported and configured, not copied: its pre-training entry point
(``maxtext.trainers.pre_train.train``) initializes the config and builds the state, the data
iterator and the jitted step exactly as its ``train_loop`` does, and this script then times that
step on one fixed synthetic batch, as the codemix worker times its own step.

    python bench/maxtext_worker.py --steps 10 --warmup 2 [--set key=value ...]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

# Set before JAX or MaxText is imported: CPU only, no Google Cloud clients, no downloads.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("DECOUPLE_GCLOUD", "TRUE")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

# The benchmark model in MaxText's own config keys (base.yml names); see maxtext_compare.py.
MODEL = {
    "decoder_block": "llama2",  # pre-norm RMSNorm, RoPE, SwiGLU (mlp_activations silu, linear)
    "base_num_decoder_layers": 4,
    "base_emb_dim": 256,
    "base_num_query_heads": 4,
    "base_num_kv_heads": 4,
    "head_dim": 64,
    "base_mlp_dim": 1024,
    "vocab_size": 32000,
    "logits_via_embedding": False,  # untied output head
    "max_target_length": 256,
    "per_device_batch_size": 8,
    "dtype": "float32",
    "weight_dtype": "float32",
}

# How it runs: one CPU device, synthetic data, nothing written or downloaded, AdamW as codemix's.
# ``hardware`` stays at its default: MaxText's "cpu" means a multi-process CPU cluster launched by
# XPK (it calls jax.distributed.initialize from launcher variables); kernels are chosen by the
# devices' actual platform, which JAX_PLATFORMS=cpu makes CPU.
RUN = {
    "dataset_type": "synthetic",
    "enable_checkpointing": False,
    "enable_tensorboard": False,
    "enable_goodput_recording": False,
    "monitor_goodput": False,
    "opt_type": "adamw",
    "adam_b1": 0.9,
    "adam_b2": 0.95,
    "adam_eps": 1e-8,
    "adam_weight_decay": 0.1,
    "gradient_clipping_threshold": 1.0,
    "log_config": False,
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10, help="timed steps after warm-up")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps (compile included)")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra MaxText config override (e.g. remat_policy=minimal); repeatable",
    )
    return parser.parse_args()


def maxtext_argv(output_dir: str, steps: int, extra: list[str]) -> list[str]:
    """The argv MaxText's ``train.main`` would get: program, base.yml, ``key=value`` overrides."""
    import maxtext

    base_yml = os.path.join(os.path.dirname(maxtext.__file__), "configs", "base.yml")
    overrides = {
        **MODEL,
        **RUN,
        "base_output_directory": output_dir,
        "run_name": "bench",
        "steps": steps,
    }
    return ["maxtext_worker", base_yml, *(f"{k}={v}" for k, v in overrides.items()), *extra]


def main() -> None:
    args = parse_args()
    import jax
    from flax import nnx
    from flax.core.spmd import logical_axis_rules
    from maxtext.trainers.pre_train import train
    from maxtext.utils import max_utils, maxtext_utils, sharding, train_utils

    with tempfile.TemporaryDirectory(prefix="maxtext-bench-") as output_dir:
        argv = maxtext_argv(output_dir, args.warmup + args.steps, args.set)
        config, _ = train.initialize(argv)
        # The same setup as MaxText's train_loop: (init_rng, checkpoint_manager, state shardings,
        # model, mesh, learning-rate schedule, data iterator, data loader, rampup manager, eval
        # iterator, state).
        (_, _, state_mesh_shardings, _, mesh, _, data_iterator, _, _, _, state) = (
            train_utils.setup_train_loop(config, None)
        )
        graphdef, state = nnx.split(state)
        params_shardings, state_mesh_shardings = sharding.maybe_update_params_sharding_with_opt(
            config, state_mesh_shardings
        )
        p_train_step, _ = train_utils.jit_train_and_eval_step(
            config,
            graphdef,
            mesh,
            state,
            state_mesh_shardings,
            train.train_step,
            params_shardings=params_shardings,
        )
        params = nnx.state(nnx.merge(graphdef, state).model, nnx.Param)
        num_params = max_utils.calculate_num_params_from_pytree(params)
        tflops_per_device = maxtext_utils.calculate_tflops_training_per_device(config, log=False)

        times = []
        with jax.set_mesh(mesh), logical_axis_rules(config.logical_axis_rules):
            batch = next(data_iterator)
            for i in range(args.warmup + args.steps):
                start = time.perf_counter()
                state, metrics = p_train_step(state, batch)
                jax.block_until_ready(metrics)
                if i >= args.warmup:
                    times.append(time.perf_counter() - start)

    import maxtext

    result = {
        "system": "maxtext",
        "version": getattr(maxtext, "__version__", "?"),
        "python": sys.version.split()[0],
        "jax": jax.__version__,
        "devices": jax.device_count(),
        "step_times_s": times,
        "tokens_per_step": int(config.global_batch_size_to_train_on * config.max_target_length),
        "num_params": int(num_params),
        "maxtext_tflops_per_device_per_step": tflops_per_device,
        "settings": {
            key: str(getattr(config, key))
            for key in ("scan_layers", "remat_policy", "attention", "dtype", "weight_dtype")
        },
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
