"""Ray Serve deployments: thin wrappers adding batching, resources and handles to model code."""
