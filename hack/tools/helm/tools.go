//go:build tools

// Package tools pins the helm CLI, which the tests use to lint, render, install,
// upgrade and uninstall charts/jobwatch; nothing here is compiled into jobwatch.
//
//	hack/build-tool.sh helm helm.sh/helm/v4/cmd/helm
package tools

import _ "helm.sh/helm/v4/cmd/helm"
