"""``python -m clipcl``: the same CLI as the ``clipcl`` command."""

from .cli import main

main()
