{{/*
Names. With release name `jobwatch` every object has the name manifests/ gives it
(jobwatch-operator, jobwatch-leases, jobwatch-metrics, jobwatch), so that
tests/unit/test_chart.py compares like with like; any other release name is prefixed
(`team-a` -> team-a-jobwatch-operator), so that two releases never share a
cluster-scoped name. 52 characters leave room for the longest suffix ("-dashboard")
within the 63 of a label value.
*/}}
{{- define "jobwatch.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 52 | trimSuffix "-" -}}
{{- else if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 52 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 52 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "jobwatch.operatorName" -}}
{{- printf "%s-operator" (include "jobwatch.fullname" .) -}}
{{- end -}}

{{/*
Labels. `app.kubernetes.io/name` is always "jobwatch": the ServiceMonitor turns it
into the `job` label, and the alert rules and the dashboard select job="jobwatch".
*/}}
{{- define "jobwatch.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: jobwatch
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/part-of: jobwatch
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{/*
The operator pods of this release. manifests/ selects on name and component only;
here the instance is part of every selector, so that two releases in one namespace
(shards) never count, spread or scrape each other's pods.
*/}}
{{- define "jobwatch.selectorLabels" -}}
app.kubernetes.io/name: jobwatch
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}

{{/*
What the operator may do with JobWatches, Secrets and Events: manifests/rbac/role.yaml's
rules, in the ClusterRole (all namespaces) or in one Role per watched namespace.
- JobWatches: list and watch (the informer), never write the main resource, only its
  status subresource; `delete` is for spec.ttlSecondsAfterFinished.
- Secrets: `get` only, by name (no list/watch: the operator cannot enumerate them); a
  Secret is used only if it carries jobwatch.dev/allow-use: "true".
- Events: one per phase change, through either Events API.
*/}}
{{- define "jobwatch.operatorRules" -}}
- apiGroups: [jobwatch.dev]
  resources: [jobwatches]
  verbs: [get, list, watch, delete]
- apiGroups: [jobwatch.dev]
  resources: [jobwatches/status]
  verbs: [get, patch, update]
- apiGroups: [""]
  resources: [secrets]
  verbs: [get]
- apiGroups: [""]
  resources: [events]
  verbs: [create, patch]
- apiGroups: [events.k8s.io]
  resources: [events]
  verbs: [create, patch]
{{- end -}}

{{- define "jobwatch.image" -}}
{{- $image := .Values.image -}}
{{- if $image.digest -}}
{{- printf "%s:%s@%s" $image.repository $image.tag $image.digest -}}
{{- else -}}
{{- printf "%s:%s" $image.repository $image.tag -}}
{{- end -}}
{{- end -}}

{{/*
A number as the operator reads it. Helm reads every number of the values as a float,
which prints 1048576 as 1.048576e+06: whole numbers are printed as integers.
*/}}
{{- define "jobwatch.number" -}}
{{- if eq (float64 .) (floor .) -}}
{{- int64 . -}}
{{- else -}}
{{- toString . -}}
{{- end -}}
{{- end -}}

{{/*
Seconds in a Go duration (`15s`, `1m30s`, `500ms`), to check the relations between
settings that the schema cannot express; values.schema.json has already checked the form.
*/}}
{{- define "jobwatch.seconds" -}}
{{- $units := dict "ns" 0.000000001 "us" 0.000001 "µs" 0.000001 "μs" 0.000001 "ms" 0.001 "s" 1.0 "m" 60.0 "h" 3600.0 -}}
{{- $total := 0.0 -}}
{{- range regexFindAll "([0-9]+\\.?[0-9]*|\\.[0-9]+)(ns|us|µs|μs|ms|s|m|h)" (toString .) -1 -}}
{{- $number := regexFind "^([0-9]+\\.?[0-9]*|\\.[0-9]+)" . -}}
{{- $total = addf $total (mulf (float64 $number) (get $units (trimPrefix $number .))) -}}
{{- end -}}
{{- $total -}}
{{- end -}}

{{/*
Relations between values that the operator checks at start-up (app/config.py) and
values.schema.json cannot express: failed here, at `helm install`, rather than as a
crash-looping pod.
*/}}
{{- define "jobwatch.validate" -}}
{{- $leases := .Values.leases -}}
{{- if and (not $leases.enabled) (gt (int64 .Values.replicaCount) 1) -}}
{{- fail (printf "replicaCount: %d replicas need leases.enabled (without Leases every replica polls every JobWatch)" (int64 .Values.replicaCount)) -}}
{{- end -}}
{{- if $leases.enabled -}}
{{- $duration := include "jobwatch.seconds" (default "15s" $leases.duration) | float64 -}}
{{- $renew := include "jobwatch.seconds" (default "10s" $leases.renewDeadline) | float64 -}}
{{- $retry := include "jobwatch.seconds" (default "2s" $leases.retryPeriod) | float64 -}}
{{- if not (and (gt $duration $renew) (gt $renew (mulf 1.2 $retry)) (gt $retry 0.0)) -}}
{{- fail (printf "leases.duration > leases.renewDeadline > 1.2 x leases.retryPeriod > 0 must hold (they are %s, %s, %s)" (default "15s" $leases.duration) (default "10s" $leases.renewDeadline) (default "2s" $leases.retryPeriod)) -}}
{{- end -}}
{{- end -}}
{{- $breaker := .Values.hosts.breaker -}}
{{- $cooldown := include "jobwatch.seconds" (default "5s" $breaker.cooldown) | float64 -}}
{{- $maxCooldown := include "jobwatch.seconds" (default "5m" $breaker.maxCooldown) | float64 -}}
{{- if or (le $cooldown 0.0) (lt $maxCooldown $cooldown) -}}
{{- fail (printf "hosts.breaker.cooldown must be above 0 and at most hosts.breaker.maxCooldown (they are %s, %s)" (default "5s" $breaker.cooldown) (default "5m" $breaker.maxCooldown)) -}}
{{- end -}}
{{- $budget := include "jobwatch.seconds" (default "10s" .Values.shutdownBudget) | float64 -}}
{{- if ge $budget (float64 .Values.terminationGracePeriodSeconds) -}}
{{- fail (printf "shutdownBudget (%s) must be below terminationGracePeriodSeconds (%d), or the kubelet kills the operator before it has flushed status and handed its Leases over" (default "10s" .Values.shutdownBudget) (int64 .Values.terminationGracePeriodSeconds)) -}}
{{- end -}}
{{- if eq (int64 .Values.ports.health) (int64 .Values.ports.metrics) -}}
{{- fail (printf "ports.health and ports.metrics are both %d" (int64 .Values.ports.health)) -}}
{{- end -}}
{{- end -}}
