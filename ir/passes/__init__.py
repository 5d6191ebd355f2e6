"""Named, pure passes from one IR artifact to the next: classify -> fuse -> derive."""
from .classify import NodeClass, classify
from .fuse import ScanGroup, fuse_scan, inline_maps
from .attention import AttentionGroup, fuse_attention
from .blocks import TileTable, classify_tiles, classify_tiles_runtime, kv_tile_bounds
from .derive import ScanVariant, derive_scan_variants

__all__ = ["AttentionGroup", "fuse_attention", "TileTable", "classify_tiles", "classify_tiles_runtime",
           "kv_tile_bounds", "NodeClass", "classify", "ScanGroup", "fuse_scan", "inline_maps", "ScanVariant",
           "derive_scan_variants"]
