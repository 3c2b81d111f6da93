"""Reading images and masks, discovering datasets, and generating the embedded demo data."""

from defectlens.data.dataset import Sample, find_normal_images, find_test_samples, list_images
from defectlens.data.images import IMAGE_SUFFIXES, read_image, read_mask

__all__ = [
    "IMAGE_SUFFIXES",
    "Sample",
    "find_normal_images",
    "find_test_samples",
    "list_images",
    "read_image",
    "read_mask",
]
