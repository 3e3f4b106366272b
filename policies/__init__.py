"""shoal policies: pure ``nn.Module`` actors, critics and action distributions."""

from policies.actor_critic import POLICY_KINDS, ActorCritic, PolicySpec, ValueNorm
from policies.distributions import ActionHead, Categorical, DiagGaussian
from policies.gnn import EDGE_MODES, GNNActor, GNNCritic, GraphEncoder, build_edges
from policies.mlp import MLPActor, MLPCritic

__all__ = [
    "EDGE_MODES",
    "POLICY_KINDS",
    "ActionHead",
    "ActorCritic",
    "Categorical",
    "DiagGaussian",
    "GNNActor",
    "GNNCritic",
    "GraphEncoder",
    "MLPActor",
    "MLPCritic",
    "PolicySpec",
    "ValueNorm",
    "build_edges",
]
