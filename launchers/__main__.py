"""`python -m launchers` is `bln-sweep`."""

from launchers.cli import main

main()
