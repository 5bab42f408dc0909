from dataclasses import dataclass

from headwise.cache.compact import LayerCache
from headwise.policies.base import CompressContext, LayerState, Policy, keep_all


@dataclass(frozen=True)
class FullPolicy(Policy):
    """Keep every row: the reference every other policy is measured against."""

    name = "full"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.kept != 1.0:
            from headwise.errors import InvalidInput

            raise InvalidInput(f"policy 'full' keeps everything; kept must be 1.0, got {self.kept!r}")

    def compress_layer(self, state: LayerState, ctx: CompressContext) -> LayerCache:
        return keep_all(state)
