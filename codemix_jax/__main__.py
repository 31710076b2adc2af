"""``python -m codemix_jax`` is the ``codemix`` command."""

import sys

from codemix_jax.cli import main

sys.exit(main())
