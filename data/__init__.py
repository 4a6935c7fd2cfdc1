"""Dataset builders. Each returns a `Splits`; `loaders.make_loaders` turns one into DataLoaders."""

from data.splits import Splits

__all__ = ["Splits"]
