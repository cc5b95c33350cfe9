-- jobwatch.dev/JobWatch: the watch of a job behind an HTTP status endpoint.
-- Healthy once the job succeeded, Degraded when it failed or timed out, Suspended while
-- polling is suspended, Progressing while it runs and until the operator has seen the
-- latest spec (a spec edit re-runs even a finished watch). Uses only Lua's base library,
-- so it runs as well from argocd-cm, where the other libraries are off by default.
local status = obj.status
if status == nil or status.phase == nil then
  return {status = "Progressing", message = "Waiting for the operator to start the watch"}
end
if status.observedGeneration ~= obj.metadata.generation then
  return {status = "Progressing", message = "Waiting for the operator to observe the latest spec"}
end

local message = status.phase
if status.message ~= nil then
  message = status.phase .. ": " .. status.message
end
if status.phase == "Succeeded" then
  return {status = "Healthy", message = message}
end
if status.phase == "Failed" or status.phase == "TimedOut" then
  return {status = "Degraded", message = message}
end
for _, condition in ipairs(status.conditions or {}) do
  if condition.type == "Reconciling" and condition.reason == "Suspended" then
    return {status = "Suspended", message = condition.message}
  end
end
return {status = "Progressing", message = message}
