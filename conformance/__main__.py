"""``python -m normref.conformance``: the ``normref`` command; ``conformance`` unless another is named."""

import sys

from .cli import main

argv = sys.argv[1:]
if not argv or argv[0] not in ("conformance", "bench", "--version"):
    argv = ["conformance"] + argv
sys.exit(main(argv))
