"""Paper B: stitching a smaller SAE into a larger one, the interpolation path between them, and meta-SAEs."""
