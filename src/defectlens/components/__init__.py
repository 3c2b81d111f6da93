"""Shared maths used by several methods: feature pyramids, Gaussian statistics, smoothing."""
