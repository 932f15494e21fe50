"""`python -m deploy.kuberay`: write the KubeRay manifests (deploy/kuberay/*.yaml)."""

from deploy.kuberay import main

main()
