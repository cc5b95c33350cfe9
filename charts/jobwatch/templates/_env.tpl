{{/*
The operator container's env: the JOBWATCH_* variables of operator/jobwatch/app/config.py,
from the values. A setting left null is not set, so that the operator's own default
applies and the default env equals manifests/manager/deployment.yaml's.
*/}}
{{- define "jobwatch.env" -}}
{{- $v := .Values -}}
{{- $env := list -}}
{{- if $v.leases.enabled -}}
{{- /* Bucketed ownership through Leases in the pod's own namespace. */ -}}
{{- $env = append $env (dict "name" "JOBWATCH_LEASE_NAMESPACE" "valueFrom" (dict "fieldRef" (dict "fieldPath" "metadata.namespace"))) -}}
{{- end -}}
{{- /* Each replica is known by its pod name, in the Leases and in status.holder. */ -}}
{{- $env = append $env (dict "name" "JOBWATCH_IDENTITY" "valueFrom" (dict "fieldRef" (dict "fieldPath" "metadata.name"))) -}}
{{- with $v.egress.deny -}}
{{- $env = append $env (dict "name" "JOBWATCH_EGRESS_DENY" "value" (join "," .)) -}}
{{- end -}}
{{- with $v.egress.allow -}}
{{- $env = append $env (dict "name" "JOBWATCH_EGRESS_ALLOW" "value" (join "," .)) -}}
{{- end -}}
{{- with $v.watchNamespaces -}}
{{- $env = append $env (dict "name" "JOBWATCH_NAMESPACES" "value" (join "," .)) -}}
{{- end -}}
{{- with $v.labelSelector -}}
{{- $pairs := list -}}
{{- range $key := keys . | sortAlpha -}}
{{- $pairs = append $pairs (printf "%s=%s" $key (toString (get $v.labelSelector $key))) -}}
{{- end -}}
{{- $env = append $env (dict "name" "JOBWATCH_LABEL_SELECTOR" "value" (join "," $pairs)) -}}
{{- end -}}
{{- with $v.hosts.limits -}}
{{- $entries := list -}}
{{- range . -}}
{{- $host := ternary (printf "[%s]" .host) .host (contains ":" .host) -}}
{{- $entries = append $entries (printf "%s:%d=%s/%d" $host (int64 .port) (include "jobwatch.number" .qps) (int64 .inFlight)) -}}
{{- end -}}
{{- $env = append $env (dict "name" "JOBWATCH_HOST_LIMITS" "value" (join "," $entries)) -}}
{{- end -}}
{{- /* (variable, value): set when the value is not null. */ -}}
{{- $settings := list
  (list "JOBWATCH_LOG_LEVEL" $v.logLevel)
  (list "JOBWATCH_LOG_FORMAT" $v.logFormat)
  (list "JOBWATCH_MAX_BODY_BYTES" $v.maxBodyBytes)
  (list "JOBWATCH_MAX_IN_FLIGHT" $v.maxInFlight)
  (list "JOBWATCH_STATUS_PROGRESS_INTERVAL" $v.status.progressInterval)
  (list "JOBWATCH_STATUS_QPS" $v.status.qps)
  (list "JOBWATCH_STATUS_BURST" $v.status.burst)
  (list "JOBWATCH_EVENT_QPS" $v.events.qps)
  (list "JOBWATCH_EVENT_BURST" $v.events.burst)
  (list "JOBWATCH_DELETE_QPS" $v.deletes.qps)
  (list "JOBWATCH_DELETE_BURST" $v.deletes.burst)
  (list "JOBWATCH_SECRET_TTL" $v.secrets.ttl)
  (list "JOBWATCH_SECRET_QPS" $v.secrets.qps)
  (list "JOBWATCH_SECRET_BURST" $v.secrets.burst)
  (list "JOBWATCH_HOST_MAX_IN_FLIGHT" $v.hosts.maxInFlight)
  (list "JOBWATCH_HOST_QPS" $v.hosts.qps)
  (list "JOBWATCH_HOST_BREAKER_FAILURES" $v.hosts.breaker.failures)
  (list "JOBWATCH_HOST_BREAKER_COOLDOWN" $v.hosts.breaker.cooldown)
  (list "JOBWATCH_HOST_BREAKER_MAX_COOLDOWN" $v.hosts.breaker.maxCooldown)
  (list "JOBWATCH_SHUTDOWN_BUDGET" $v.shutdownBudget)
-}}
{{- if $v.leases.enabled -}}
{{- /* Two releases in one namespace must not share Leases (their replicas would refuse
each other's scope): the group defaults to the release's name prefix, and is left to
the operator's default ("jobwatch") where that is the prefix, as in manifests/. */ -}}
{{- $group := $v.leases.group -}}
{{- $prefix := include "jobwatch.fullname" . | replace "." "-" | trunc 40 | trimSuffix "-" -}}
{{- if and (kindIs "invalid" $group) (ne $prefix "jobwatch") -}}
{{- $group = $prefix -}}
{{- end -}}
{{- $settings = concat $settings (list
  (list "JOBWATCH_LEASE_GROUP" $group)
  (list "JOBWATCH_BUCKETS" $v.leases.buckets)
  (list "JOBWATCH_LEASE_DURATION" $v.leases.duration)
  (list "JOBWATCH_LEASE_RENEW_DEADLINE" $v.leases.renewDeadline)
  (list "JOBWATCH_LEASE_RETRY_PERIOD" $v.leases.retryPeriod)
) -}}
{{- end -}}
{{- /* The ports are always in the container's ports; the env only when not the operator's default. */ -}}
{{- if ne (int64 $v.ports.health) 8080 -}}
{{- $settings = append $settings (list "JOBWATCH_HEALTH_PORT" $v.ports.health) -}}
{{- end -}}
{{- if ne (int64 $v.ports.metrics) 9090 -}}
{{- $settings = append $settings (list "JOBWATCH_METRICS_PORT" $v.ports.metrics) -}}
{{- end -}}
{{- range $settings -}}
{{- $value := index . 1 -}}
{{- if not (kindIs "invalid" $value) -}}
{{- $text := toString $value -}}
{{- if not (kindIs "string" $value) -}}
{{- $text = include "jobwatch.number" $value -}}
{{- end -}}
{{- $env = append $env (dict "name" (index . 0) "value" $text) -}}
{{- end -}}
{{- end -}}
{{- /* Every JOBWATCH_* variable has a value here (tests/unit/test_chart.py checks it),
whose form the schema checks; extraEnv would get round that. */ -}}
{{- $extra := dict -}}
{{- range $v.extraEnv -}}
{{- if hasPrefix "JOBWATCH_" .name -}}
{{- fail (printf "extraEnv: %s has a value of its own in this chart (values.yaml); set that instead" .name) -}}
{{- end -}}
{{- if hasKey $extra .name -}}
{{- fail (printf "extraEnv: %s is given twice" .name) -}}
{{- end -}}
{{- $_ := set $extra .name true -}}
{{- end -}}
{{- toYaml (concat $env $v.extraEnv) -}}
{{- end -}}
