{{/*
The operator's permissions, each rule with what it is for. Split by scope: the
namespaced rules go into a Role in every namespace of watchNamespaces (or into the
ClusterRole when it is empty, to serve every namespace); the cluster-scoped ones always
go into the ClusterRole. templates/rbac.yaml assembles them.
*/}}

{{- define "collabtrain.namespacedRules" -}}
# Watch jobs; kopf patches its finalizer and annotations onto them, and
# spec.autoscaling's decisions patch spec.replicas.
- apiGroups: [collabtrain.io]
  resources: [collaborativetrainingjobs]
  verbs: [list, watch, patch]
# The operator's status reports.
- apiGroups: [collabtrain.io]
  resources: [collaborativetrainingjobs/status]
  verbs: [patch]
# Owner references with blockOwnerDeletion on the children.
- apiGroups: [collabtrain.io]
  resources: [collaborativetrainingjobs/finalizers]
  verbs: [update]
# Peer pods: watched (index), created, deleted, finalizer removed (patch).
- apiGroups: [""]
  resources: [pods]
  verbs: [list, watch, create, delete, patch]
# The coordinator: watched for readiness, server-side applied, deleted after the TTL.
- apiGroups: [apps]
  resources: [deployments]
  verbs: [list, watch, create, patch, delete]
# The coordinator's Service and the trainer ConfigMap: server-side applied, deleted.
- apiGroups: [""]
  resources: [services, configmaps]
  verbs: [create, patch, delete]
# Credentials: the job key's Secret (owned by the coordinator Deployment) and each
# peer's token Secret (owned by its pod). Created only: the operator derives them again
# instead of reading them, and the garbage collector deletes them with their owners.
# No get, list, watch, patch or delete, each of which would hand back a Secret's data.
- apiGroups: [""]
  resources: [secrets]
  verbs: [create]
# The jobs' NetworkPolicies: server-side applied, deleted when turned off or after the TTL.
- apiGroups: [networking.k8s.io]
  resources: [networkpolicies]
  verbs: [create, patch, delete]
# The coordinator's PodDisruptionBudget: server-side applied, deleted after the TTL.
- apiGroups: [policy]
  resources: [poddisruptionbudgets]
  verbs: [create, patch, delete]
# Standby capacity (spec.capacity.standby): a PodTemplate shaped like a peer and a
# CapacityBuffer that asks the node autoscaler to keep room for it; applied, deleted.
- apiGroups: [""]
  resources: [podtemplates]
  verbs: [create, patch, delete]
- apiGroups: [autoscaling.x-k8s.io]
  resources: [capacitybuffers]
  verbs: [create, patch, delete]
# Kubernetes Events on the jobs.
- apiGroups: [""]
  resources: [events]
  verbs: [create]
{{- end }}

{{- define "collabtrain.clusterRules" -}}
# Interruption taints of nodes (spot notices).
- apiGroups: [""]
  resources: [nodes]
  verbs: [list, watch]
# kopf: notices CRDs and namespaces coming and going.
- apiGroups: [apiextensions.k8s.io]
  resources: [customresourcedefinitions]
  verbs: [list, watch]
- apiGroups: [""]
  resources: [namespaces]
  verbs: [list, watch]
{{- if .Values.peering.enabled }}
# kopf peering among the operator's replicas.
- apiGroups: [kopf.dev]
  resources: [clusterkopfpeerings]
  verbs: [list, watch, patch, get]
{{- end }}
{{- end }}
