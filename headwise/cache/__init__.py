from headwise.cache.compact import NO_RECALL, CompactCache, LayerCache, RecallTable

__all__ = ["NO_RECALL", "CompactCache", "LayerCache", "RecallTable"]
