"""NUMA: topology discovery, memory binding, expert-store placement and tuning."""

from hybrid_runtime.numa.placement import (
    PLACEMENTS,
    MemoryReport,
    NumaExpertExecutor,
    default_placement,
    partition_ranges,
    placement_memory,
)
from hybrid_runtime.numa.topology import Node, Topology, discover
from hybrid_runtime.numa.tune import NumaConfig, load_numa_config

__all__ = [
    "PLACEMENTS", "MemoryReport", "Node", "NumaConfig", "NumaExpertExecutor", "Topology",
    "default_placement", "discover", "load_numa_config", "partition_ranges", "placement_memory",
]
