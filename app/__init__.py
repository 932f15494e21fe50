"""rayinfer: online model serving on Ray Serve."""
