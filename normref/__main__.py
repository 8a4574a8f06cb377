"""``python -m normref``: the ``normref`` command (``python -m normref --help``).

The command line lives in :mod:`normref.conformance.cli`; it is imported only here, when the
command runs, so that ``import normref`` stays free of it.
"""

import sys


def _main() -> int:
    from normref.conformance.cli import main

    return main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(_main())
