"""`python -m defectlens ...`: the same as the `defectlens` command."""

from defectlens.cli import main

main()
