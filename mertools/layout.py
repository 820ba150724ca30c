"""Where things go inside an output folder: paths from integers only, offsets rounded up to the alignment."""

from __future__ import annotations

from dataclasses import dataclass

from mer_runtime.manifest import FORMAT_VERSION, SCALE_ROLES, SCALES_FORMAT_VERSION

from .sources.plan import ExpertPlan, Projection

ALIGNMENT = 4096  # one O_DIRECT read fetches a whole expert or one projection
EXPERTS_DIR = "experts"
DENSE_NAME = "dense.gguf"


def align_up(n: int, a: int = ALIGNMENT) -> int:
    return (n + a - 1) // a * a


def expert_path(layer: int, expert: int) -> str:
    # Tensor names never become paths: only these two integers do.
    return f"{EXPERTS_DIR}/L{int(layer):03d}/E{int(expert):04d}.bin"


@dataclass(frozen=True)
class Placed:
    projection: Projection
    offset: int  # in the shard file


@dataclass(frozen=True)
class ShardLayout:
    layer: int
    expert: int
    path: str
    size: int
    placed: list[Placed]


def place(plan: ExpertPlan, alignment: int = ALIGNMENT) -> ShardLayout:
    """Projections back to back in role order, each starting on an alignment boundary; file padded to one."""
    off = 0
    placed = []
    for p in plan.projections:
        placed.append(Placed(p, off))
        off = align_up(off + p.nbytes, alignment)
    return ShardLayout(plan.layer, plan.expert, expert_path(plan.layer, plan.expert), off, placed)


def format_version_for(plans: list[ExpertPlan]) -> int:
    """1, or 2 when any expert carries a *_scale role: a reader that does not apply scales must refuse the folder."""
    scaled = any(p.role in SCALE_ROLES for plan in plans for p in plan.projections)
    return SCALES_FORMAT_VERSION if scaled else FORMAT_VERSION
