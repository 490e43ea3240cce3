"""``python -m jax_embedding``: the same as the ``jax-embedding`` command."""

import sys

from jax_embedding.cli import main

sys.exit(main())
