"""The `defectlens` command line: one module per command, on the shared options of `common`;
`app` assembles the group and turns every error into one line and an exit status.

Exit statuses: 0 success; 1 some inputs were skipped (listed in the results with their error);
2 a user error (one line `defectlens: error: ...`); 3 an internal error (one line, and the
traceback with `--debug`); 130 interrupted (Ctrl-C or SIGTERM), with what was finished saved.
Outputs are checked before any work, so a bad `--out` fails in a second, not after an hour.
"""

from defectlens.cli.app import cli, main

__all__ = ["cli", "main"]
