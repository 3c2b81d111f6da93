"""Build the registration model that ships with defectlens, from freely licensed images only.

    python -m defectlens.training.default_registration [--out FOLDER] [--max-minutes 15]

Every category is one of scikit-image's public-domain / CC0 sample images seen in 48 random
poses (`data.synthetic.make_pose_category`); no image of the research-only development sets
is read. The result (about 1.2 MB) is committed under `defectlens/weights/`, so `fit
--method regad` works offline on a fresh install; this command reproduces it (same seed, same
images; the float results may differ in the last bits across CPUs and torch builds).
"""

from __future__ import annotations

import argparse
import tempfile
from importlib import resources
from pathlib import Path

from defectlens.data.synthetic import POSE_SOURCES, make_pose_category
from defectlens.training.registration import RegistrationConfig, build_registration

BACKBONE, IMAGE_SIZE = "efficientnet_lite0", 256


def default_folder() -> Path:
    return (
        Path(str(resources.files("defectlens")))
        / "weights"
        / (f"registration-{BACKBONE}-{IMAGE_SIZE}")
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=default_folder())
    parser.add_argument("--images", type=int, default=48, help="poses per category")
    parser.add_argument("--max-epochs", type=int, default=20)
    parser.add_argument("--max-minutes", type=float, default=15.0)
    args = parser.parse_args()
    config = RegistrationConfig(max_epochs=args.max_epochs, max_minutes=args.max_minutes)
    with tempfile.TemporaryDirectory(prefix="defectlens-pose-") as root:
        pool = [make_pose_category(root, name, args.images, IMAGE_SIZE) for name in POSE_SOURCES]
        path, record = build_registration(
            pool, args.out, BACKBONE, None, IMAGE_SIZE, config, progress=True
        )
    best = min(record["history"], key=lambda r: r["val_loss"])
    print(f"saved {path}: best validation loss {best['val_loss']:.4f}, {record['seconds']:.0f} s")


if __name__ == "__main__":
    main()
