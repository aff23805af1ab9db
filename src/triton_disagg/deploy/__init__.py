"""Deployments described by one YAML file: the spec, its checks, and what it renders to (Kubernetes manifests)."""
