"""The Argo CD health check (integrations/argocd/), run the way Argo CD runs it.

Argo CD runs health scripts in gopher-lua, a Lua 5.1: the script sees the live object as
the global `obj` and returns a table `{status, message}`. A script from `argocd-cm` runs
with only Lua's base, table and package libraries and a reduced `os` (no string, math or
io library, not even as string methods), so that is the environment built here; the
built-in scripts upstream get all the libraries, a superset. The cases are those of
`health_test.yaml`, in the format of Argo CD's own `resource_customizations/` tests.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from lupa import lua51

REPO = Path(__file__).resolve().parents[2]
CHECK = REPO / "integrations/argocd/resource_customizations/jobwatch.dev/JobWatch"
SCRIPT = (CHECK / "health.lua").read_text()
CASES = yaml.safe_load((CHECK / "health_test.yaml").read_text())["tests"]
CONFIG_KEY = "resource.customizations.health.jobwatch.dev_JobWatch"
# health.HealthStatusCode values; Argo CD turns any other status into Unknown.
VALID_STATUSES = {"Unknown", "Progressing", "Suspended", "Healthy", "Degraded", "Missing"}

# Runs `script` as argocd-cm's VM does (util/lua/lua.go, UseOpenLibs false).
_SANDBOX = """
function(script, obj)
  local env = {}
  for name, value in pairs(_G) do env[name] = value end
  env.string, env.math, env.io, env.debug, env.coroutine, env.python = nil
  env.os = {time = os.time, date = os.date}
  env._G, env.obj = env, obj
  getmetatable("").__index = nil
  local chunk = assert(loadstring(script, "health.lua"))
  setfenv(chunk, env)
  return chunk()
end
"""


def health(obj: dict[str, Any]) -> dict[str, str]:
    lua = lua51.LuaRuntime(register_eval=False)
    assert lua.lua_version == (5, 1)
    returned = lua.eval(_SANDBOX)(SCRIPT, lua.table_from(obj, recursive=True))
    assert lua.eval("type")(returned) == "table", f"the script returned {returned!r}"
    result = {"status": returned["status"] or "", "message": returned["message"] or ""}
    if result["status"] not in VALID_STATUSES:
        return {"status": "Unknown", "message": "Lua returned an invalid health status"}
    return result


def load_object(path: Path) -> dict[str, Any]:
    # Argo CD reads testdata as JSON-compatible YAML (sigs.k8s.io/yaml); json.dumps
    # refuses what would not survive that, such as an unquoted YAML timestamp.
    return dict(json.loads(json.dumps(yaml.safe_load(path.read_text()))))


@pytest.mark.parametrize("case", CASES, ids=[case["inputPath"] for case in CASES])
def test_health_test_yaml_case(case: dict[str, Any]) -> None:
    obj = load_object(CHECK / case["inputPath"])
    assert health(obj) == {"message": "", **case["healthStatus"]}


def test_every_testdata_file_is_a_case() -> None:
    used = {case["inputPath"] for case in CASES}
    present = {f"testdata/{path.name}" for path in (CHECK / "testdata").glob("*.yaml")}
    assert used == present


def test_no_string_library_in_the_sandbox() -> None:
    """The sandbox is as strict as argocd-cm's VM: a script that needs more fails here."""
    lua = lua51.LuaRuntime(register_eval=False)
    run = lua.eval(_SANDBOX)
    for needs_more in ('return ("x"):upper()', "return string.len('x')", "return math.max(1)"):
        with pytest.raises(lua51.LuaError):
            run(needs_more, lua.table_from({}))


def docs_snippet() -> str:
    """The Lua of the argocd-cm snippet in docs/api.md's Argo CD section."""
    docs = (REPO / "docs" / "api.md").read_text()
    blocks = [
        block
        for block in re.findall(r"^```yaml\n(.*?)^```", docs, flags=re.DOTALL | re.MULTILINE)
        if CONFIG_KEY in block
    ]
    assert len(blocks) == 1, f"docs/api.md should have one yaml block with {CONFIG_KEY}"
    return str(yaml.safe_load(blocks[0])["data"][CONFIG_KEY])


def test_docs_snippet_is_the_health_script() -> None:
    indented = "".join(f"    {line}" if line.strip() else line for line in SCRIPT.splitlines(True))
    expected = f"data:\n  {CONFIG_KEY}: |\n{indented}"
    assert docs_snippet() == SCRIPT, f"docs/api.md's snippet should read:\n{expected}"
