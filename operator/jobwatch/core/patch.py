"""The JSON patch a status write sends, and the fence it carries (layer: core).

Pure: it only builds bytes. The status rendering encodes fields with `encode_json`,
the writer wraps them in an `EncodedStatus` and remembers a `Fence` per object, and
the Kubernetes adapter sends what `status_patch` makes.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

# A status field's JSON text, as it goes into a patch: compact, ASCII (a lone surrogate a
# job's endpoint sent cannot make the body unencodable), no NaN or Infinity (not JSON).
encode_json = json.JSONEncoder(allow_nan=False, sort_keys=True, separators=(",", ":")).encode


class EncodedStatus(dict[str, Any]):
    """A whole `status` (a None value: the field is absent) as the status writer has
    already encoded it: `texts` holds the JSON text of each present field, and `changed`
    the fields that differ from what the object's status holds (None: not known, the
    status is written whole). A dict, so that whoever reads it as a plain status can."""

    __slots__ = ("changed", "texts")

    def __init__(
        self, status: Mapping[str, Any], texts: Mapping[str, str], changed: tuple[str, ...] | None
    ) -> None:
        super().__init__(status)
        self.texts, self.changed = texts, changed


@dataclass(frozen=True, slots=True)
class Fence:
    """What a status write expects the object's stored status to hold: whether there is
    one, who wrote it (`status.holder`) and its phase. The write is refused unless the
    object still holds exactly that, so a replica that lost the object cannot undo what
    the object's new holder wrote (see `status_patch`)."""

    present: bool
    holder: str | None
    phase: str | None

    @classmethod
    def of(cls, status: object) -> Fence:
        """The fence for a stored `status` (None: the object has none)."""
        if not isinstance(status, Mapping):
            return cls(status is not None, None, None)
        holder, phase = status.get("holder"), status.get("phase")
        return cls(
            True,
            holder if isinstance(holder, str) else None,
            phase if isinstance(phase, str) else None,
        )


def _pointer(key: str) -> str:
    return "/status/" + key.replace("~", "~0").replace("/", "~1")


def status_patch(uid: str, status: Mapping[str, Any], fence: Fence | None = None) -> bytes:
    """The JSON patch that writes `status`, only on the object with this uid, and with a
    `fence` only while its stored status is still what the fence says.

    A JSON patch rather than a merge patch: a merge patch reads null as "delete", and
    `status.result` may hold nulls that must stay. The `test` of the uid keeps a write
    from landing on a re-created namesake; the fence's tests (`/status` null, or
    `/status/holder` and `/status/phase`, null matching an absent field) keep a replica
    that lost the object from overwriting the status its new holder wrote. Written whole
    (`add /status`) unless the status says which fields changed: then only those (`add
    /status/<field>`), so that a progress write sends a few hundred bytes, not the whole
    status again.
    """
    if isinstance(status, EncodedStatus):
        texts, changed = status.texts, status.changed
    else:
        texts = {k: encode_json(v) for k, v in status.items() if v is not None}
        changed = None
    ops = [f'{{"op":"test","path":"/metadata/uid","value":{encode_json(uid)}}}']
    if fence is not None:
        ops += _fence_tests(fence)
    if changed is None:
        fields = ",".join(f"{encode_json(k)}:{text}" for k, text in texts.items())
        ops.append(f'{{"op":"add","path":"/status","value":{{{fields}}}}}')
    else:
        ops += [
            f'{{"op":"add","path":{encode_json(_pointer(k))},"value":{texts[k]}}}' for k in changed
        ]
    return f"[{','.join(ops)}]".encode()


def _fence_tests(fence: Fence) -> list[str]:
    def test(path: str, value: str | None) -> str:
        return f'{{"op":"test","path":"{path}","value":{encode_json(value)}}}'

    if not fence.present:
        return [test("/status", None)]
    return [test("/status/holder", fence.holder), test("/status/phase", fence.phase)]
