"""Spot and on-demand capacity: the node label schemes of the providers, the node affinity
and tolerations that place pods on one or the other, and the taints that announce that a
node is about to go away.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from collabtrain_operator.api import CapacityProvider

KubeObject = dict[str, Any]


@dataclass(frozen=True)
class ProviderScheme:
    """How one provider marks spot nodes."""

    provider: CapacityProvider
    label: str
    spot_values: tuple[str, ...]
    on_demand_values: tuple[str, ...]
    # The taint some setups put on spot nodes, so that only pods that accept
    # interruption land there; peers tolerate it.
    spot_taint_value: str | None


SCHEMES: dict[CapacityProvider, ProviderScheme] = {
    "karpenter": ProviderScheme(
        provider="karpenter",
        label="karpenter.sh/capacity-type",
        spot_values=("spot",),
        on_demand_values=("on-demand",),
        spot_taint_value="spot",
    ),
    "gke": ProviderScheme(
        provider="gke",
        label="cloud.google.com/gke-spot",
        spot_values=("true",),
        on_demand_values=(),  # GKE labels only spot nodes
        spot_taint_value="true",
    ),
    "eks": ProviderScheme(
        provider="eks",
        label="eks.amazonaws.com/capacityType",
        spot_values=("SPOT",),
        on_demand_values=("ON_DEMAND",),
        spot_taint_value=None,
    ),
    "aks": ProviderScheme(
        provider="aks",
        label="kubernetes.azure.com/scalesetpriority",
        spot_values=("spot",),
        on_demand_values=(),  # AKS labels only spot node pools
        spot_taint_value="spot",  # AKS always taints spot pools
    ),
}

# Taints that announce a node's imminent end (spot reclaim, consolidation, shutdown).
# A peer lost on such a node is a preemption, and the operator asks the coordinator to
# drain the node's peers as soon as the taint appears.
INTERRUPTION_TAINTS: tuple[str, ...] = (
    "karpenter.sh/disrupted",
    "karpenter.sh/disruption",  # Karpenter before v1
    "aws-node-termination-handler/spot-itn",
    "aws-node-termination-handler/asg-lifecycle-termination",
    "aws-node-termination-handler/scheduled-maintenance",
    "cloud.google.com/impending-node-termination",
    "node.cloudprovider.kubernetes.io/shutdown",
    "ToBeDeletedByClusterAutoscaler",
)

# Preferred-affinity weight of spot placement; the maximum, so that it outweighs the
# user's own preferences only when they are weaker.
SPOT_WEIGHT = 100


def interruption_taints(node_taints: Iterable[KubeObject]) -> list[str]:
    """The keys among `node_taints` (a Node's spec.taints) that announce interruption."""
    return [taint["key"] for taint in node_taints if taint.get("key") in INTERRUPTION_TAINTS]


def _schemes(providers: Sequence[CapacityProvider]) -> list[ProviderScheme]:
    return [SCHEMES[provider] for provider in dict.fromkeys(providers)]


def spot_tolerations(providers: Sequence[CapacityProvider]) -> list[KubeObject]:
    return [
        {
            "key": scheme.label,
            "operator": "Equal",
            "value": scheme.spot_taint_value,
            "effect": "NoSchedule",
        }
        for scheme in _schemes(providers)
        if scheme.spot_taint_value is not None
    ]


def spot_node_terms(providers: Sequence[CapacityProvider]) -> list[KubeObject]:
    """Node selector terms, one per provider (terms are ORed): a node that any provider
    labels as spot."""
    return [
        {"matchExpressions": [{"key": s.label, "operator": "In", "values": list(s.spot_values)}]}
        for s in _schemes(providers)
    ]


def not_spot_expressions(providers: Sequence[CapacityProvider]) -> list[KubeObject]:
    """Match expressions (ANDed within a term) that exclude every provider's spot nodes;
    nodes without the labels at all (plain on-demand clusters) still match."""
    return [
        {"key": s.label, "operator": "NotIn", "values": list(s.spot_values)}
        for s in _schemes(providers)
    ]


def on_demand_preferences(providers: Sequence[CapacityProvider]) -> list[KubeObject]:
    """Preferred terms for nodes that a provider labels explicitly as on-demand."""
    return [
        {
            "weight": SPOT_WEIGHT,
            "preference": {
                "matchExpressions": [
                    {"key": s.label, "operator": "In", "values": list(s.on_demand_values)}
                ]
            },
        }
        for s in _schemes(providers)
        if s.on_demand_values
    ]


def spot_affinity(providers: Sequence[CapacityProvider], *, required: bool) -> KubeObject:
    """Node affinity for spot capacity: preferred, or required when `required`."""
    terms = spot_node_terms(providers)
    if required:
        return {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": terms}}
    return {
        "preferredDuringSchedulingIgnoredDuringExecution": [
            {"weight": SPOT_WEIGHT, "preference": term} for term in terms
        ]
    }


def on_demand_affinity(providers: Sequence[CapacityProvider]) -> KubeObject:
    """Node affinity that keeps a pod off spot capacity of every provider."""
    affinity: KubeObject = {
        "requiredDuringSchedulingIgnoredDuringExecution": {
            "nodeSelectorTerms": [{"matchExpressions": not_spot_expressions(providers)}]
        }
    }
    preferences = on_demand_preferences(providers)
    if preferences:
        affinity["preferredDuringSchedulingIgnoredDuringExecution"] = preferences
    return affinity


def merge_node_affinity(ours: KubeObject, theirs: KubeObject | None) -> KubeObject:
    """Combine collabtrain's node affinity with the user's.

    The user's preferences replace ours (they know their cluster better). Requirements are
    combined with AND: terms are ORed in Kubernetes, so our expressions are added to each of
    the user's terms.
    """
    if not theirs:
        return ours
    required_key = "requiredDuringSchedulingIgnoredDuringExecution"
    preferred_key = "preferredDuringSchedulingIgnoredDuringExecution"
    merged: KubeObject = {}

    our_terms = ours.get(required_key, {}).get("nodeSelectorTerms", [])
    their_terms = theirs.get(required_key, {}).get("nodeSelectorTerms", [])
    if our_terms and their_terms:
        merged[required_key] = {
            "nodeSelectorTerms": [
                {
                    **their_term,
                    "matchExpressions": [
                        *their_term.get("matchExpressions", []),
                        *our_term.get("matchExpressions", []),
                    ],
                }
                for their_term in their_terms
                for our_term in our_terms
            ]
        }
    elif our_terms or their_terms:
        merged[required_key] = {"nodeSelectorTerms": their_terms or our_terms}

    preferred = theirs.get(preferred_key) or ours.get(preferred_key)
    if preferred:
        merged[preferred_key] = preferred
    return merged
