"""``python -m inferplane.cli``: the same as the ``inferplane`` console script."""

from inferplane.cli import main

main()
