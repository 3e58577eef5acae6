{{/* Chart name, truncated to a DNS label. */}}
{{- define "collabtrain.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name: the release name, with the chart name appended unless already in it. */}}
{{- define "collabtrain.fullname" -}}
{{- if contains .Chart.Name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{- define "collabtrain.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels that select the operator's pods; never change them between releases. */}}
{{- define "collabtrain.selectorLabels" -}}
app.kubernetes.io/name: {{ include "collabtrain.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{- define "collabtrain.labels" -}}
helm.sh/chart: {{ include "collabtrain.chart" . }}
{{ include "collabtrain.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: collabtrain
{{- end }}

{{- define "collabtrain.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "collabtrain.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "collabtrain.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* The Secret holding the operator's master key (key `master-key`). */}}
{{- define "collabtrain.masterKeySecret" -}}
{{- default (printf "%s-master-key" (include "collabtrain.fullname" .)) .Values.masterKey.existingSecret }}
{{- end }}
