"""Files and DICOM network I/O only: NIfTI, DICOM series reading, DICOM SEG and RTSTRUCT, PACS sends,
atomic writes and voxel/world geometry. Imports nothing from the rest of segapp but ``app.errors``."""
