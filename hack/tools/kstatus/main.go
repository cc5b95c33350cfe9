// Command kstatus prints what kstatus (sigs.k8s.io/cli-utils), the library behind Flux's
// health checks, computes for one object: it reads the object's JSON on stdin and writes
// {"status": "...", "message": "..."} on stdout. The e2e tests feed it live JobWatches, so
// docs/api.md's kstatus table is checked against the real library rather than a copy of it.
package main

import (
	"encoding/json"
	"fmt"
	"io"
	"os"

	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"sigs.k8s.io/cli-utils/pkg/kstatus/status"
)

type answer struct {
	Status  string `json:"status"`
	Message string `json:"message"`
}

func main() {
	if err := run(os.Stdin, os.Stdout); err != nil {
		fmt.Fprintln(os.Stderr, "kstatus:", err)
		os.Exit(1)
	}
}

func run(in io.Reader, out io.Writer) error {
	data, err := io.ReadAll(in)
	if err != nil {
		return fmt.Errorf("reading stdin: %w", err)
	}
	// Decoded the way client-go decodes it (integers as int64), as kstatus expects:
	// it reads metadata.generation and status.observedGeneration as int64.
	var obj unstructured.Unstructured
	if err := obj.UnmarshalJSON(data); err != nil {
		return fmt.Errorf("decoding the object: %w", err)
	}
	result, err := status.Compute(&obj)
	if err != nil {
		return fmt.Errorf("computing the status: %w", err)
	}
	return json.NewEncoder(out).Encode(answer{Status: string(result.Status), Message: result.Message})
}
