{{/*
Names and labels shared by every template. Cluster-scoped objects (ClusterRoles and their bindings) carry the
full name so that they say which release they belong to.
*/}}

{{- define "switchyard.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "switchyard.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "switchyard.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Selector labels of one component: pass (dict "ctx" $ "component" "operator"). */}}
{{- define "switchyard.selectorLabels" -}}
app.kubernetes.io/name: {{ include "switchyard.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/* Every label of one component: pass (dict "ctx" $ "component" "operator"). */}}
{{- define "switchyard.labels" -}}
{{ include "switchyard.selectorLabels" . }}
app.kubernetes.io/version: {{ .ctx.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
app.kubernetes.io/part-of: switchyard
helm.sh/chart: {{ include "switchyard.chart" .ctx }}
{{- end }}

{{- define "switchyard.operator.name" -}}
{{- printf "%s-operator" (include "switchyard.fullname" .) }}
{{- end }}

{{- define "switchyard.agent.clusterRoleName" -}}
{{- printf "%s-agent" (include "switchyard.fullname" .) }}
{{- end }}

{{- define "switchyard.cleanup.name" -}}
{{- printf "%s-cleanup" (include "switchyard.fullname" .) }}
{{- end }}

{{- define "switchyard.operator.image" -}}
{{- printf "%s:%s" .Values.operator.image.repository (.Values.operator.image.tag | default .Chart.AppVersion) }}
{{- end }}

{{- define "switchyard.agent.image" -}}
{{- printf "%s:%s" .Values.agent.image.repository (.Values.agent.image.tag | default .Chart.AppVersion) }}
{{- end }}

{{/*
The API server the operator's own client uses. The kubelet points KUBERNETES_SERVICE_HOST at the `kubernetes`
Service's ClusterIP, which only works once a service proxy runs; the operator is what starts the proxy, so it
must not depend on it either. Empty when apiServer.host is unset (the kubelet's values then apply).
*/}}
{{- define "switchyard.apiServerEnv" -}}
{{- if .Values.apiServer.host }}
- name: KUBERNETES_SERVICE_HOST
  value: {{ .Values.apiServer.host | quote }}
- name: KUBERNETES_SERVICE_PORT
  value: {{ .Values.apiServer.port | quote }}
{{- end }}
{{- end }}

{{/* The security context of every container this chart runs: non-root, read-only, no capabilities. */}}
{{- define "switchyard.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
runAsNonRoot: true
capabilities:
  drop:
    - ALL
{{- end }}

{{- define "switchyard.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 65532
runAsGroup: 65532
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/* Checks that values.schema.json cannot express, or that must hold with --skip-schema-validation too. */}}
{{- define "switchyard.validate" -}}
{{- if and .Values.defaultProxyConfig.enabled (not .Values.apiServer.host) }}
{{- fail "defaultProxyConfig.enabled needs apiServer.host: the agents must reach the API server without the kubernetes Service's ClusterIP (set --set apiServer.host=<API server address>)" }}
{{- end }}
{{- if and (gt (int .Values.operator.replicas) 1) (not .Values.operator.leaderElection) }}
{{- fail "operator.replicas above 1 needs operator.leaderElection=true: two operators without a leader would fight over the same DaemonSets" }}
{{- end }}
{{- end }}
