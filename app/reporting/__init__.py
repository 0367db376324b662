"""Reports for people: PNG overlays of a segmentation."""
