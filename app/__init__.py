"""segapp: MONAI-based 3D medical image segmentation.

Conventions used throughout the package (geometry is sacred):

* Arrays are indexed ``[i, j, k]`` (voxel coordinates). For DICOM, ``i`` runs along a row
  (column index), ``j`` down a column (row index), ``k`` over slices sorted along the slice normal.
* Every array travels with its 4x4 affine. Names say the frame: ``affine_lps`` maps voxel
  ``(i, j, k)`` to DICOM patient coordinates (LPS, mm); ``affine_ras`` maps to RAS (mm), the frame of
  NIfTI files and of MONAI ``MetaTensor.affine``. ``app.io.geometry`` converts between them.
"""

__version__ = "0.1.0"
