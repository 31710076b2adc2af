"""``python -m codemix_jax`` and the ``codemix`` console script: the CLI, its native libraries'
start-up noise filtered out (``startup_noise``)."""

import sys

from codemix_jax import startup_noise


def main() -> int:
    startup_noise.quiet()
    from codemix_jax import cli  # Only now: TF and JAX log as they load.

    return cli.main()


if __name__ == "__main__":
    sys.exit(main())
