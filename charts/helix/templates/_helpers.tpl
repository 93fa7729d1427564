{{/* Names and labels shared by every template. */}}

{{- define "helix.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "helix.fullname" -}}
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

{{- define "helix.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "helix.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* The operator's own objects are component=operator: the objects it creates for a HelixCluster are
     worker|router|plan and carry the HelixCluster's name as instance, so the selectors never overlap. */}}
{{- define "helix.selectorLabels" -}}
app.kubernetes.io/name: {{ include "helix.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{- define "helix.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "helix.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "helix.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{- define "helix.workerImage" -}}
{{- printf "%s:%s" .Values.workers.image.repository (default .Chart.AppVersion .Values.workers.image.tag) }}
{{- end }}

{{/* The routers run `helix router` from the operator image unless another image is given. */}}
{{- define "helix.routerImage" -}}
{{- if .Values.routers.image.repository }}
{{- printf "%s:%s" .Values.routers.image.repository (default .Chart.AppVersion .Values.routers.image.tag) }}
{{- else }}
{{- include "helix.image" . }}
{{- end }}
{{- end }}

{{/* Cluster-wide writes are an explicit opt-in (operator.clusterWide); otherwise the operator serves
     the namespaces listed, or the release namespace when none are. */}}
{{- define "helix.clusterWide" -}}
{{- if .Values.operator.clusterWide }}true{{ end }}
{{- end }}

{{- define "helix.watchNamespaces" -}}
{{- toJson (default (list .Release.Namespace) .Values.operator.watchNamespaces) }}
{{- end }}

{{/* What the operator does in a namespace it serves: reconcile HelixClusters (kopf patches them for
     its progress annotations, the operator their status; no finalizer: there is no deletion handler),
     own the objects it rolls out, post events. Every write is a create, a merge patch or a delete
     (never a PUT), so no `update`, except `helixclusters/finalizers: update`: owned objects carry
     blockOwnerDeletion, which clusters with the OwnerReferencesPermissionEnforcement admission plugin
     (OpenShift, hardened clusters) allow only with it. */}}
{{- define "helix.workloadRules" -}}
- apiGroups: ["helix.ai"]
  resources: ["helixclusters"]
  verbs: ["get", "list", "watch", "patch"]
- apiGroups: ["helix.ai"]
  resources: ["helixclusters/status"]
  verbs: ["patch"]
- apiGroups: ["helix.ai"]
  resources: ["helixclusters/finalizers"]
  verbs: ["update"]
- apiGroups: [""]
  resources: ["configmaps", "pods", "services"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
- apiGroups: ["apps"]
  resources: ["deployments"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create"]
# A HelixCluster's data-plane keys: made once, read back, never listed, changed or deleted (garbage
# collection removes them with their HelixCluster).
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["get", "create"]
{{- end }}
