"""``python -m rollback_rl.experiments.compare``: the ``compare`` command on its own (same as ``rollback-rl compare``)."""

import sys

from rollback_rl.experiments.compare.command import main

if __name__ == "__main__":
    sys.exit(main())
