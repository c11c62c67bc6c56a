"""Morphology prototypes: features (DINO), k-means clustering and image-derived prompts."""
