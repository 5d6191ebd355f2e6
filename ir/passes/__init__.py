"""Named, pure passes from one IR artifact to the next: classify -> fuse -> derive."""
from .classify import NodeClass, classify
from .fuse import ScanGroup, fuse_scan, inline_maps
from .derive import ScanVariant, derive_scan_variants

__all__ = ["NodeClass", "classify", "ScanGroup", "fuse_scan", "inline_maps", "ScanVariant", "derive_scan_variants"]
