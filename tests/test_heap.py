"""The worker's collector settings once it serves (process/memory.py settle_heap), checked
in a fresh interpreter: the process's own collector is not this test's to change."""

from __future__ import annotations

import json
import subprocess
import sys

from llproxy.process.memory import YOUNG_COLLECTION_THRESHOLD

PROBE = """
import gc, json
import llproxy.server.app  # what a worker holds before it serves
from llproxy.process.memory import settle_heap
before = gc.get_freeze_count(), gc.get_threshold()
settle_heap()
print(json.dumps([before, gc.get_freeze_count(), gc.get_threshold(), gc.is_tracked([])]))
"""


def test_settle_heap_freezes_what_the_worker_made_and_collects_young_objects_less_often() -> None:
    out = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    (frozen_before, threshold_before), frozen_after, threshold_after, tracked = json.loads(out)
    assert frozen_before == 0
    # Python's default (700; 2,000 from 3.13) is lower, so the change below is ours.
    assert threshold_before[0] < YOUNG_COLLECTION_THRESHOLD
    # Every module, class and constant loaded so far is out of the collector's walks.
    assert frozen_after > 10_000
    assert threshold_after == [YOUNG_COLLECTION_THRESHOLD, *threshold_before[1:]]
    assert tracked  # objects made later are still collected
