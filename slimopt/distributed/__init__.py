"""slimopt across ranks: owner-rank updates for FSDP2 and DDP, and checkpoints through torch.distributed.checkpoint."""

from slimopt.distributed.placement import check_placement, row_counts
from slimopt.distributed.plan import MODES, Plan, assign_owners, build_plan, state_bytes_here

__all__ = ["MODES", "Plan", "assign_owners", "build_plan", "check_placement", "row_counts", "state_bytes_here"]
