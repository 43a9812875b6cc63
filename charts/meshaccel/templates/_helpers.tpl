{{/* Chart name. */}}
{{- define "meshaccel.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Fully qualified app name (63 characters at most: a DNS label). */}}
{{- define "meshaccel.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "meshaccel.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels on every object. */}}
{{- define "meshaccel.labels" -}}
helm.sh/chart: {{ include "meshaccel.chart" . }}
{{ include "meshaccel.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* Labels that select the agent pods. */}}
{{- define "meshaccel.selectorLabels" -}}
app.kubernetes.io/name: {{ include "meshaccel.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: agent
{{- end }}

{{- define "meshaccel.serviceAccountName" -}}
{{- include "meshaccel.fullname" . }}
{{- end }}

{{/* The agent image. */}}
{{- define "meshaccel.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/* Where the host paths appear in the containers (outside /sys: the runtime's default AppArmor
profile forbids writes under /sys, and the agent pins under the bpffs). */}}
{{- define "meshaccel.cgroupMount" -}}/host/sys/fs/cgroup{{- end }}
{{- define "meshaccel.bpffsMount" -}}/host/sys/fs/bpf{{- end }}
{{- define "meshaccel.bpffsDir" -}}/host/sys/fs/bpf/meshaccel{{- end }}
{{- define "meshaccel.stateDir" -}}/run/meshaccel{{- end }}

{{/* The container security context: not privileged, only the listed capabilities. */}}
{{- define "meshaccel.containerSecurityContext" -}}
privileged: false
# allowPrivilegeEscalation is left unset: Kubernetes rejects `false` together with SYS_ADMIN.
readOnlyRootFilesystem: true
runAsUser: 0
runAsGroup: 0
runAsNonRoot: false
capabilities:
  drop: ["ALL"]
  add:
  {{- range .Values.capabilities }}
  - {{ . | quote }}
  {{- end }}
seccompProfile:
  type: {{ .Values.seccompProfile }}
{{- end }}
