"""Deployment artefacts: the container image (Dockerfile) and the KubeRay manifests (kuberay/)."""
