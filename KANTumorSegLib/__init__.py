"""KANTumorSegLib: brain tumour segmentation with a Kolmogorov-Arnold U-Net (KANU-Net 2D).

Plain Python that imports without 3D Slicer. Importing the package loads nothing heavy;
torch and SimpleITK are imported by the modules that need them.
"""

__version__ = "0.1.0"
