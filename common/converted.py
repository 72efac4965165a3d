"""The files `dsv4 convert` writes next to the weights: read by the loader, plan, deploy and inspect, written by
tools/convert."""

from __future__ import annotations

CONVERT_INFO = "dsv4_convert.json"  # model summary, recipe, and the `parallel` section of a split layout
MANIFEST = "dsv4_manifest.json"  # size and sha256 of every output and source file; written LAST
JOURNAL = "dsv4_progress.json"  # an unfinished run: its identity and the shards finished so far
