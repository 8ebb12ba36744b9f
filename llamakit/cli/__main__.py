"""`python -m llamakit.cli`: the `llamakit` command."""

from llamakit.cli import main

main()
