"""The `defectlens` command group and its entry point, `main`, which turns every error into
one line and an exit status (the statuses are listed in the package's docstring and `--help`).
"""

from __future__ import annotations

import os
import signal
import sys
import traceback
import warnings

import click

from defectlens import __version__
from defectlens.cli.backbones import backbones
from defectlens.cli.common import (
    EXIT_INTERNAL,
    EXIT_INTERRUPTED,
    EXIT_USER,
    RUN_STATE,
    Interrupted,
    echo,
    start_run,
    warn,
)
from defectlens.cli.demo import demo
from defectlens.cli.evaluate import evaluate
from defectlens.cli.export import export
from defectlens.cli.fit import fit
from defectlens.cli.predict import predict
from defectlens.cli.regad import regad
from defectlens.cli.select import select
from defectlens.cli.serve import serve
from defectlens.cli.threshold import threshold
from defectlens.errors import (
    DefectLensError,
    DefectLensWarning,
    command_line_messages,
)
from defectlens.results import one_line

# What `pip install defectlens` (the deployment runtime) leaves out and `[full]` brings.
FULL_INSTALL_MODULES = {"torch", "efficientnet_lite_pytorch", "FrEIA", "onnx", "onnxscript"}

EXAMPLES = """
\b
Typical use:
  defectlens fit data/bottle --method padim --out models/bottle
  defectlens evaluate models/bottle data/bottle --out results/bottle
  defectlens predict models/bottle line-camera/*.png --out flagged/
  defectlens export models/bottle --out deploy/bottle   # scores without torch
  defectlens demo                        # everything on built-in synthetic data
\b
Exit status: 0 ok, 1 some inputs skipped (listed with their error), 2 user error,
3 internal error (rerun as `defectlens --debug COMMAND ...` for the traceback), 130 interrupted,
141 the output pipe was closed (e.g. `predict --json ... | head`).
"""


@click.group(epilog=EXAMPLES)
@click.version_option(__version__, prog_name="defectlens")
@click.option("--debug", is_flag=True, help="Show the traceback of an internal error.")
def cli(debug: bool) -> None:
    """Industrial visual anomaly detection from normal images only, fully offline.

    Fit a model on images of good parts, then score new images: each gets an anomaly score, a
    pixel anomaly map, a defect mask and a good/defective decision. Thresholds are set from
    held-out normal images, never from test labels.
    """
    RUN_STATE["debug"] = debug


COMMANDS = (backbones, demo, evaluate, export, fit, predict, regad, select, serve, threshold)
for _command in COMMANDS:
    cli.add_command(_command)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    if issubclass(category, DefectLensWarning):
        warn(str(message))
    else:
        _default_showwarning(message, category, filename, lineno, file, line)


_default_showwarning = warnings.showwarning


def _command_named(args: list[str]) -> str:
    """The command path in `args` ("defectlens regad train"), for a usage error click raised
    without its context (a missing option value, e.g. `predict MODEL X --out`)."""
    path, group = ["defectlens"], cli
    for arg in args:
        if arg.startswith("-"):  # e.g. --debug before the command
            continue
        sub = group.commands.get(arg) if isinstance(group, click.Group) else None
        if sub is None:
            break
        path.append(arg)
        group = sub
    return " ".join(path)


def _on_sigterm(signum, frame) -> None:
    raise Interrupted()


def main() -> None:
    warnings.showwarning = _show_warning
    start_run()
    if hasattr(signal, "SIGTERM"):
        signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        # click's own main() turns a broken pipe into a silent exit 1 ("some inputs skipped"
        # here) and prints usage errors over several lines: run the command directly instead.
        with command_line_messages(), cli.make_context("defectlens", sys.argv[1:]) as context:
            cli.invoke(context)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except BrokenPipeError:  # e.g. `defectlens predict ... --json | head`: stop quietly
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        sys.exit(128 + signal.SIGPIPE)
    except (click.exceptions.Abort, KeyboardInterrupt):
        if RUN_STATE["saved"] is not None:  # only the summary was left to print
            saved = RUN_STATE["saved"]
            echo(f"defectlens: interrupted after {saved} was saved; it is kept", err=True)
            sys.exit(0)
        echo("defectlens: interrupted", err=True)
        sys.exit(EXIT_INTERRUPTED)
    except getattr(click.exceptions, "NoArgsIsHelpError", ()) as exc:  # bare `defectlens`
        click.echo(exc.format_message(), err=True)
        sys.exit(EXIT_USER)
    except click.UsageError as exc:  # one line too, pointing at the right --help
        command = exc.ctx.command_path if exc.ctx is not None else _command_named(sys.argv[1:])
        message = f"defectlens: error: {exc.format_message()} (see '{command} --help')"
        click.echo(one_line(message), err=True)
        sys.exit(EXIT_USER)
    except click.ClickException as exc:
        click.echo(one_line(f"defectlens: error: {exc.format_message()}"), err=True)
        sys.exit(EXIT_USER)
    except DefectLensError as exc:
        click.echo(one_line(f"defectlens: error: {exc}"), err=True)
        sys.exit(EXIT_USER)
    except OSError as exc:  # the environment: disk full, permission, a file that vanished
        where = f"{exc.filename}: " if exc.filename else ""
        click.echo(one_line(f"defectlens: error: {where}{exc.strerror or exc}"), err=True)
        sys.exit(EXIT_USER)
    except RuntimeError as exc:
        if "can't allocate memory" not in str(exc) and "not enough memory" not in str(exc):
            _internal_error(exc)
        _out_of_memory()
    except MemoryError:
        _out_of_memory()
    except ModuleNotFoundError as exc:
        if exc.name not in FULL_INSTALL_MODULES:
            _internal_error(exc)
        echo(
            f"defectlens: error: this needs {exc.name}, which the deployment-only install "
            "leaves out: pip install 'defectlens[full]' (an exported model scores without it)",
            err=True,
        )
        sys.exit(EXIT_USER)
    except Exception as exc:
        _internal_error(exc)


def _out_of_memory() -> None:
    echo(
        "defectlens: error: out of memory; try a smaller --batch-size or --image-size, "
        "or lower --max-pixels",
        err=True,
    )
    sys.exit(EXIT_USER)


def _internal_error(exc: BaseException) -> None:
    if RUN_STATE["debug"]:
        traceback.print_exception(exc)
    first = str(exc).splitlines()[0] if str(exc) else ""
    echo(
        f"defectlens: internal error: {type(exc).__name__}: {first[:300]} "
        "(a bug: rerun as `defectlens --debug COMMAND ...` for the traceback and please report it)",
        err=True,
    )
    sys.exit(EXIT_INTERNAL)
