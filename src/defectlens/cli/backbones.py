"""`defectlens backbones`, and which of them this machine has weights for."""

from __future__ import annotations

import click

from defectlens.cli.common import (
    echo,
)
from defectlens.errors import DefectLensError


@click.command()
def backbones() -> None:
    """List the registered backbones, their feature taps and whether weights are available."""
    from defectlens.backbones import available_backbones

    for spec in available_backbones():
        taps = ", ".join(f"{s}:{c}" for s, c in sorted(spec.taps.items()))
        echo(f"{spec.name:20s} taps(stride:channels) {taps}")
        status = spec.weights_status()
        echo(f"{'':20s} {spec.description}; weights {status}")
        if status.startswith("missing"):
            echo(f"{'':20s} to supply them: {spec.weights_help}")


def installed_backbones() -> list[str]:
    """Every registered backbone whose weights can be found without a download, in registry order.

    `select --backbones installed` tries them all: what pays off depends on the data
    (BENCHMARKS.md), so the pool is what the user has, not a list we guessed.
    """
    from defectlens.backbones import available_backbones

    found = [s.name for s in available_backbones() if s.weights_status().startswith("available")]
    if not found:
        raise DefectLensError("--backbones installed: no backbone has its weights on this machine")
    return found
