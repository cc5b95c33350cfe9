//go:build tools

// Package tools pins the Kubernetes binaries this project builds for its
// local control plane; nothing here is compiled into jobwatch.
package tools

import (
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kube-controller-manager"
	_ "k8s.io/kubernetes/cmd/kubectl"
)
