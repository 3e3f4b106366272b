"""shoal policies: pure ``nn.Module`` actors, critics and action distributions."""

from policies.actor_critic import POLICY_KINDS, ActorCritic, PolicySpec, ValueNorm
from policies.distributions import ActionHead, Categorical, DiagGaussian
from policies.edges import EDGE_MODES, build_edges, build_neighbours
from policies.gnn import GNNActor, GNNCritic, GraphEncoder
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
    "build_neighbours",
]
