{{/* Chart name, or nameOverride. */}}
{{- define "dpo-operator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name of the resources (and of the leader-election Lease): release name plus chart name. */}}
{{- define "dpo-operator.fullname" -}}
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

{{- define "dpo-operator.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels of every object. */}}
{{- define "dpo-operator.labels" -}}
helm.sh/chart: {{ include "dpo-operator.chart" . }}
{{ include "dpo-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* Selector labels: only name and instance, which never change over upgrades. */}}
{{- define "dpo-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "dpo-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "dpo-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "dpo-operator.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* Who the operator's roles are bound to. */}}
{{- define "dpo-operator.subjects" -}}
- kind: ServiceAccount
  name: {{ include "dpo-operator.serviceAccountName" . }}
  namespace: {{ .Release.Namespace }}
{{- end }}

{{- define "dpo-operator.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}
{{- end }}

{{/*
The operator's rules on DPOJobs and their children: the same as operator/deploy/rbac.yaml without the CRD
rule (a test keeps them equal). Bound cluster-wide, or per namespace in watchNamespaces.
*/}}
{{- define "dpo-operator.rules" -}}
- apiGroups: [dpo-operator.io]
  resources: [dpojobs]
  verbs: [get, list, watch]
- apiGroups: [dpo-operator.io]
  resources: [dpojobs/status]
  verbs: [get, patch]
# Children carry blockOwnerDeletion; clusters enforcing OwnerReferencesPermissionEnforcement (OpenShift)
# require update on the owner's finalizers subresource for that. The operator adds no finalizer.
- apiGroups: [dpo-operator.io]
  resources: [dpojobs/finalizers]
  verbs: [update]
# patch: a run that fails at once on a server without podFailurePolicy is stopped (parallelism 0).
- apiGroups: [batch]
  resources: [jobs]
  verbs: [get, list, watch, create, patch, delete]
- apiGroups: [""]
  resources: [configmaps]
  verbs: [get, create, delete]
# Pods are only read: their phase, their termination message, and their log (the metrics channel).
- apiGroups: [""]
  resources: [pods]
  verbs: [get, list, watch]
- apiGroups: [""]
  resources: [pods/log]
  verbs: [get]
- apiGroups: [""]
  resources: [events]
  verbs: [create, list]
{{- end }}
