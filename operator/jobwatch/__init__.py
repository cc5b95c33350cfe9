"""jobwatch: a Kubernetes operator that watches long-running jobs behind HTTP status endpoints."""

__version__ = "0.1.0"
