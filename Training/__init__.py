"""Training pipeline of KANTumorSeg: data, the study's recipe, the experiment grid and export.

Runs on CPU, one CUDA GPU or several through torchrun. Reuses the library's model and
preprocessing (never a second copy); needs the ``train`` extra (MONAI, nibabel, h5py, ...).
"""
