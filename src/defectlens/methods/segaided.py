"""Segmentation-aided detection after P-Net (Zhou et al., "Encoding Structure-Texture Relation
with P-Net for Anomaly Detection in Retinal Images", ECCV 2020).

P-Net extracts an image's *structure* (a vessel or layer segmentation), reconstructs the image
from two encoders -- one of the image (its texture), one of the structure, whose stage outputs
also feed the decoder through skip connections -- and extracts the structure again from the
reconstruction. A normal image's texture fits its structure and is rebuilt well; a defect
breaks that relation, so both the image and the re-extracted structure differ. Score map:
the per-pixel image difference |x - x'| plus the structure difference |S(x) - S(x')|, each
standardised by its mean and spread over the normal validation images' pixels (the paper
gives no weighting we could retrieve; standardising makes the two comparable without one).
Image score: the map's mean (`image_score="map_max"`: the smoothed map's maximum).

The structure map. P-Net's comes from a segmentation network trained on vessel labels, which
industrial images do not have. Ours is label-free: the Sobel gradient magnitude of the
grey-level image, i.e. its edges. It needs no training and no labels, it is what the authors'
own industrial version feeds in (Canny edges), and unlike Canny it is differentiable, so the
reconstruction can be trained to have the right structure: loss = L1(x, x') +
`structure_weight` x L1(S(x), S(x')) (0.5, the weight the authors' README gives their
structure term).

On backbone features (`space="features"`, the standardised stride-8/16 maps every trained
method can reconstruct) edges mean nothing, and the issue's other label-free choice applies:
an unsupervised segmentation of the features. Seeded k-means on the training images' feature
vectors gives `structure_clusters` (8) centres; a position's structure is its soft membership
of each cluster (softmax of minus the squared distances over their mean distance to the
nearest centre). It is differentiable too, so the same loss trains the reconstruction to land
in the input's clusters, and a part made of the wrong "material" changes it where a grain of
texture does not. Structure difference: half the L1 distance between memberships, in [0, 1].

Changed for a 2-core CPU and this code base: 128 px colour input in [-1, 1] with a tanh output;
four stride-2 stages of 32-64-128-256 channels per encoder (the paper: a U-Net down path of
64-512 on 224 px); the decoder is `components.autoencoder.ConvDecoder` with the structure
encoder's three finer stage outputs as skips, as P-Net has; no adversarial loss (the authors
add a PatchGAN discriminator at weight 0.1 for sharper reconstructions: a second network and
twice the training time here); Adam at 1e-3 with early stopping on the validation images'
loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from defectlens.components.autoencoder import ConvDecoder, ConvEncoder
from defectlens.components.clustering import assignment_temperature, kmeans, soft_assignment
from defectlens.errors import ModelFileError, ParameterError
from defectlens.methods.trained import TrainedImageMethod
from defectlens.params import check_choice, check_float, check_int

_CLUSTER_BUFFERS = ("structure_centres", "structure_temperature")
_SOBEL = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])


def edge_structure(x: torch.Tensor) -> torch.Tensor:
    """Images (B, 3, s, s) in [-1, 1] -> their edges (B, 1, s, s): the Sobel gradient
    magnitude of the grey level in [0, 1] units, replicate-padded so borders are not edges."""
    grey = (x.mean(dim=1, keepdim=True) + 1) / 2
    kernels = torch.stack([_SOBEL, _SOBEL.T])[:, None].to(x)
    gradients = F.conv2d(F.pad(grey, (1, 1, 1, 1), mode="replicate"), kernels)
    return (gradients.pow(2).sum(dim=1, keepdim=True) + 1e-12).sqrt()


class _PNet(nn.Module):
    """Texture encoder of the input, structure encoder of its structure map, and a decoder
    from both codes with the structure's finer stages as skips."""

    def __init__(
        self, channels: int, structure_channels: int, widths: tuple[int, ...], output: str
    ) -> None:
        super().__init__()
        self.image_encoder = ConvEncoder(channels, widths)
        self.structure_encoder = ConvEncoder(structure_channels, widths)
        skips = widths[-2::-1][: len(widths) - 1]  # the structure's finer stages, coarse first
        self.decoder = ConvDecoder(
            2 * widths[-1],
            (*widths[-2::-1], widths[0]),
            channels,
            output=output,
            skip_channels=skips,
        )

    def forward(self, x: torch.Tensor, structure: torch.Tensor) -> torch.Tensor:
        """The reconstruction of `x` from it and its structure map."""
        stages = self.structure_encoder.stage_outputs(structure)
        code = torch.cat([self.image_encoder(x), stages[-1]], dim=1)
        return self.decoder(code, stages[-2::-1])


class SegAided(TrainedImageMethod):
    name = "segaided"
    fitted_buffers = ("difference_stats",)
    PIXEL_WIDTHS = (32, 64, 128, 256)
    FEATURE_WIDTHS = (192, 256)  # 152 x 32 x 32 backbone maps -> a 256 x 8 x 8 code

    def __init__(
        self,
        space: str = "features",
        input_size: int = 128,
        widths: tuple[int, ...] | None = None,
        structure_weight: float = 0.5,
        structure_clusters: int = 8,
        image_score: str = "mean",
        learning_rate: float = 1e-3,
        batch_size: int = 16,
        max_epochs: int = 300,
        patience: int = 20,
        max_minutes: float = 10.0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self._init_training(
            space,
            input_size,
            widths,
            learning_rate,
            batch_size,
            max_epochs,
            patience,
            max_minutes,
            seed,
        )
        if len(self.layer_widths) < 2:
            raise ParameterError("segaided needs at least 2 widths (skip connections)")
        self.structure_weight = check_float("structure_weight", structure_weight, 0.0, 1e3)
        self.structure_clusters = check_int("structure_clusters", structure_clusters, 2, 256)
        self.image_score = check_choice("image_score", image_score, ("mean", "map_max"))
        if self.space == "features":
            self.fitted_buffers = (*self.fitted_buffers, *_CLUSTER_BUFFERS)
            for name in _CLUSTER_BUFFERS:
                self.register_buffer(name, None)

    def build(self) -> nn.Module:
        structure_channels = 1 if self.space == "pixels" else self.structure_clusters
        return _PNet(self.in_channels, structure_channels, self.layer_widths, self.output)

    def structure(self, x: torch.Tensor) -> torch.Tensor:
        """The structure map of prepared inputs: edges of pixels (B, 1, s, s), or each
        feature position's soft membership of the training features' clusters (B, k, h, w)."""
        if self.space == "pixels":
            return edge_structure(x)
        # The clusters follow the input: training moves only the network to its device.
        centres, temperature = self.structure_centres.to(x), self.structure_temperature.to(x)
        return soft_assignment(x, centres, temperature)

    def before_training(self, train: torch.Tensor) -> None:
        """Features: cluster the training images' standardised feature vectors (seeded)."""
        if self.space == "pixels":
            return
        vectors = train.permute(0, 2, 3, 1).reshape(-1, train.shape[1])
        if len(vectors) < self.structure_clusters:
            raise ParameterError(
                f"segaided needs at least structure_clusters={self.structure_clusters} "
                f"feature positions to cluster, the training images give {len(vectors)}"
            )
        centres = kmeans(vectors, self.structure_clusters, seed=self.seed)
        self.structure_centres = centres
        self.structure_temperature = assignment_temperature(vectors, centres).clamp_min(1e-6)

    def differences(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-position input and structure differences (B, s, s) of a batch. The structure
        difference is the L1 distance between memberships, halved for clusters so that both
        kinds of map are in [0, 1]."""
        structure = self.structure(x)
        reconstruction = self.net(x, structure)
        image = (reconstruction - x).abs().mean(dim=1)
        change = (self.structure(reconstruction) - structure).abs()
        return image, change[:, 0] if self.space == "pixels" else change.sum(dim=1) / 2

    def loss(self, x: torch.Tensor) -> torch.Tensor:
        image, structure = self.differences(x)
        return image.mean() + self.structure_weight * structure.mean()

    def after_training(self, train: torch.Tensor, val: torch.Tensor | None) -> None:
        """Mean and spread of both differences over the validation images' pixels."""
        data = val if val is not None else train
        parts = [self.differences(data[i : i + 32]) for i in range(0, len(data), 32)]
        rows = []
        for k in range(2):
            values = torch.cat([p[k].flatten() for p in parts])
            rows.append(torch.stack([values.mean(), values.std().clamp_min(1e-6)]))
        self.difference_stats = torch.stack(rows)

    def score(self, *x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        image, structure = self.differences(x[0])
        (i_mean, i_std), (s_mean, s_std) = self.difference_stats
        maps = (image - i_mean) / i_std + (structure - s_mean) / s_std
        return maps, maps.mean(dim=(1, 2)) if self.image_score == "mean" else None

    def check_geometry(self, image_size: int, taps: dict[int, int]) -> None:
        super().check_geometry(image_size, taps)
        if self.difference_stats.shape != (2, 2) or not bool(
            (self.difference_stats[:, 1] > 0).all()
        ):
            raise ModelFileError("segaided difference statistics must be (2, 2), spreads > 0")
        if self.space == "features":
            channels = self.feature_mean.numel()
            if self.structure_centres.shape != (self.structure_clusters, channels):
                raise ModelFileError(
                    f"segaided structure_centres must be ({self.structure_clusters}, {channels})"
                )
            if self.structure_temperature.shape != () or float(self.structure_temperature) <= 0:
                raise ModelFileError("segaided structure_temperature must be one positive value")
