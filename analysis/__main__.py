"""python -m analysis <sweep> ...: the same as bln-analyze."""

from analysis.cli import main

main()
