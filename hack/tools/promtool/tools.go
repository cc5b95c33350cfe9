//go:build tools

// Package tools pins promtool, which CI uses to check and unit-test the alert rules of
// manifests/components/monitoring; nothing here is compiled into jobwatch.
//
//	hack/build-tool.sh promtool github.com/prometheus/prometheus/cmd/promtool
package tools

import _ "github.com/prometheus/prometheus/cmd/promtool"
