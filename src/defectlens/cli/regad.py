"""`defectlens regad train`."""

from __future__ import annotations

import click

from defectlens.cli.common import (
    FiniteFloat,
    backbone_option,
    batch_size_option,
    device_option,
    echo,
    image_size_option,
    mark_saved,
    out_option,
    quiet_option,
    weights_option,
)


@click.group()
def regad() -> None:
    """RegAD few-shot detection: train the registration network it fits with.

    A registration model is trained once, on normal images of other categories; then
    `defectlens fit NEW --method regad --shots 8 --registration REG` needs 8 images of the new
    category and no training. One registration model ships with defectlens (efficientnet_lite0,
    256 px), trained on freely licensed images only.
    """


@regad.command("train")
@click.argument("pool", nargs=-1, required=True, type=click.Path())
@out_option("Registration folder to write: a new folder, or an earlier registration to replace.")
@click.option(
    "--exclude",
    multiple=True,
    metavar="CATEGORY",
    help="Leave this pool category out (by folder name), e.g. the one you will test on.",
)
@backbone_option("Frozen backbone the registration is for; fits must use the same one.")
@weights_option
@image_size_option("Image size the registration is for; fits must use the same one.")
@click.option(
    "--shots", type=click.IntRange(1, 64), default=2, show_default=True,
    help="Supports per query image.",
)  # fmt: skip
@batch_size_option("Queries per step.", default=8, most=1024)
@click.option(
    "--steps", type=click.IntRange(min=1), default=50, show_default=True, help="Steps per epoch."
)
@click.option(
    "--epochs", type=click.IntRange(min=1), default=20, show_default=True,
    help="At most this many.",
)  # fmt: skip
@click.option(
    "--patience",
    type=click.IntRange(min=1),
    default=4,
    show_default=True,
    help="Stop after this many epochs without a better validation loss.",
)
@click.option(
    "--max-minutes", type=FiniteFloat(0, 1e6, min_open=True), default=30.0, show_default=True,
    help="Wall-clock budget.",
)  # fmt: skip
@click.option(
    "--lr", type=FiniteFloat(0, 10, min_open=True), default=0.01, show_default=True,
    help="Initial SGD rate.",
)  # fmt: skip
@click.option(
    "--pose-jitter",
    type=FiniteFloat(0, 180),
    default=0.0,
    show_default=True,
    help="Rotate training images by up to this many degrees, for parts that turn on the line "
    "when the pool's do not (on parts that do not turn it lowered accuracy: BENCHMARKS.md).",
)
@click.option(
    "--backbone-lr",
    type=FiniteFloat(0, 10),
    default=0.0,
    show_default=True,
    help="Also train the backbone, at this SGD rate (the paper's way; 0 keeps it frozen). "
    "The tuned backbone is saved in OUT as backbone.safetensors; fits then pass it with "
    "--weights.",
)
@click.option("--seed", type=int, default=0, show_default=True)
@device_option("Where to train: auto (CUDA when present, else the CPU), cpu, cuda or cuda:N.")
@quiet_option
def regad_train(
    pool, out, exclude, backbone, weights, image_size, shots, batch_size, steps, epochs,
    patience, max_minutes, lr, pose_jitter, backbone_lr, seed, device, quiet,
) -> None:  # fmt: skip
    """Train a registration network on the normal images of the POOL categories.

    Each POOL entry is one category: an MVTec-layout root (its train/good is read) or a folder
    of normal images. Each category holds out 10 % of its images; the loss on those picks the
    epoch (never a test set). By default the backbone stays frozen and only the spatial
    transformers and the head train; --backbone-lr trains the backbone too. Interrupting saves
    nothing.
    """
    from defectlens.components.registration import BACKBONE_FILE
    from defectlens.training.registration import RegistrationConfig, build_registration

    config = RegistrationConfig(
        shots=shots,
        batch_size=batch_size,
        steps_per_epoch=steps,
        max_epochs=epochs,
        patience=patience,
        max_minutes=max_minutes,
        learning_rate=lr,
        pose_jitter=pose_jitter,
        backbone_learning_rate=backbone_lr,
        seed=seed,
    )
    try:
        path, record = build_registration(
            pool, out, backbone, weights, image_size, config, exclude, not quiet, device
        )
    except KeyboardInterrupt:
        echo(f"interrupted: nothing was saved; {out} is unchanged", err=True)
        raise
    mark_saved(path)
    best = min(record["history"], key=lambda r: r["val_loss"])
    echo(
        f"saved {path}: {len(record['categories'])} categories, {len(record['history'])} epochs "
        f"in {record['seconds']:.0f} s, best validation loss {best['val_loss']:.4f} "
        f"(epoch {best['epoch'] + 1})"
    )
    if backbone_lr > 0:
        echo(f"fit with: --registration {path} --weights {path / BACKBONE_FILE}")
