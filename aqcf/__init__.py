"""A-QCF-Net: dual-stream quaternion U-Net for liver and tumor segmentation from unpaired CT and MRI."""

__version__ = "0.1.0"
