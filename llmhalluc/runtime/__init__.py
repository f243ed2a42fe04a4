"""The bottom layer every other part may import: the distributed runtime and ZeRO-aware parameter helpers."""
