"""Which JobWatch a thing is about: its namespace, name and uid (layer: core).

A plain value with no I/O, so that the watch state, the log formatter and the
Kubernetes adapter can all name an object without importing one another.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ObjectRef:
    namespace: str
    name: str
    uid: str
