"""``python -m kldiv``: the ``kldiv`` command, for environments whose scripts directory is not
on ``PATH``."""

from kldiv.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
