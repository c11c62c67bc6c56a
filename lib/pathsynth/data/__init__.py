"""Data sources (official PCam HDF5, JPEG-bytes NPZ, H&E phantom), the outlier filter and the one image-set format."""
from .dataset import DataError, ImageSet, read_imageset, write_imageset

__all__ = ["DataError", "ImageSet", "read_imageset", "write_imageset"]
