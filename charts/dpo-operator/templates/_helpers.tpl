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

{{/* The chart's own labels of every object, which commonLabels and podLabels may not replace. */}}
{{- define "dpo-operator.ownLabels" -}}
helm.sh/chart: {{ include "dpo-operator.chart" . }}
{{ include "dpo-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/*
Fails when extra labels name one of the chart's own: a replaced selector label would orphan the pods of the
Deployment (its selector is immutable) and the Service's endpoints. Called with (list $ "commonLabels" $labels).
*/}}
{{- define "dpo-operator.checkLabels" -}}
{{- $root := index . 0 }}
{{- $own := include "dpo-operator.ownLabels" $root | fromYaml }}
{{- range $key, $_ := index . 2 }}
{{- if hasKey $own $key }}
{{- fail (printf "%s must not set %s: the chart sets it (the selector labels app.kubernetes.io/name and app.kubernetes.io/instance select the operator pods; nameOverride changes the name)" (index $ 1) $key) }}
{{- end }}
{{- end }}
{{- end }}

{{/* Labels of every object: the chart's own, then commonLabels. */}}
{{- define "dpo-operator.labels" -}}
{{- $common := .Values.commonLabels | default dict }}
{{- include "dpo-operator.checkLabels" (list . "commonLabels" $common) }}
{{- include "dpo-operator.ownLabels" . }}
{{- with $common }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Labels of the operator pod: those of every object, then podLabels (which win over commonLabels). */}}
{{- define "dpo-operator.podLabels" -}}
{{- $pod := .Values.podLabels | default dict }}
{{- include "dpo-operator.checkLabels" (list . "podLabels" $pod) }}
{{- include "dpo-operator.ownLabels" . }}
{{- with merge (deepCopy $pod) (.Values.commonLabels | default dict) }}
{{ toYaml . }}
{{- end }}
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
{{- $registry := .Values.image.registry | default (dig "imageRegistry" "" (.Values.global | default dict)) }}
{{- $repository := ternary (printf "%s/%s" $registry .Values.image.repository) .Values.image.repository (ne $registry "") }}
{{- if .Values.image.digest }}
{{- printf "%s@%s" $repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" $repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}
{{- end }}

{{/*
trainerDefaults less cacheClaimName (its own env var), the trainer image's registry defaulting to
global.imageRegistry: what DPO_OPERATOR_TRAINER_DEFAULTS carries.
*/}}
{{- define "dpo-operator.trainerDefaults" -}}
{{- $defaults := omit (.Values.trainerDefaults | default dict | deepCopy) "cacheClaimName" }}
{{- $registry := dig "imageRegistry" "" (.Values.global | default dict) }}
{{- if and $registry (not (dig "image" "registry" "" $defaults)) }}
{{- $_ := set $defaults "image" (merge (dict "registry" $registry) (get $defaults "image" | default dict)) }}
{{- end }}
{{- toJson $defaults }}
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
