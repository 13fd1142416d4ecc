"""netplane: a Kubernetes-style networking data plane with a minimal control plane."""
