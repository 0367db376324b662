"""MONAI-style transforms (array and dictionary versions): loading a case from NIfTI or DICOM,
intensity normalisation (CT window, dataset foreground percentiles, MR z-score), sparse-label
simulation, and augmentation of whole batches on the training device."""
