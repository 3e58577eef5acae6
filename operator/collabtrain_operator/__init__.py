"""The collabtrain Kubernetes operator (kopf). Imports no torch."""
