"""HDF5 data sharded across ranks: sources, the per-epoch plan, the prefetching loader."""
from mpidl.data.loader import ShardedLoader
from mpidl.data.shard import RankPlan, plan_epoch, plan_rank, steps_per_epoch
from mpidl.data.source import H5Source

__all__ = ["H5Source", "RankPlan", "ShardedLoader", "plan_epoch", "plan_rank", "steps_per_epoch"]
