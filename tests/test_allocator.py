"""The glibc allocator setting of the medpipe executable (``pipeline.allocator``).

Each check runs in a fresh interpreter, so this test process keeps glibc's defaults.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")

# Allocates and frees a 200 MB array, then prints the resident size (MB) before, while and after.
PROBE = """
import json, sys
import numpy as np
from pipeline.allocator import keep_freed_memory

def rss():
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * 4096 / 2**20

applied = keep_freed_memory() if sys.argv[1] == "on" else None
before = rss()
array = np.ones(200 * 2**20, np.uint8)
during = rss()
del array
print(json.dumps({"applied": applied, "before": before, "during": during, "after": rss()}))
"""


def probe(mode: str, env: dict[str, str] | None = None) -> dict:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run(
        [sys.executable, "-c", PROBE, mode],
        env={**clean, **(env or {})},
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout)


def test_freed_memory_stays_with_the_process_for_reuse():
    default, kept = probe("off"), probe("on")
    assert kept["applied"] is True
    for run in (default, kept):
        assert run["during"] - run["before"] > 190  # the array was really touched
    assert default["during"] - default["after"] > 190  # glibc's default: unmapped on free
    assert kept["during"] - kept["after"] < 10  # kept in the heap for the next array


def test_child_processes_inherit_the_setting_and_user_values_win():
    code = "import os; from pipeline.allocator import keep_freed_memory; keep_freed_memory(); " + (
        "print(os.environ['MALLOC_MMAP_THRESHOLD_'], os.environ['MALLOC_TRIM_THRESHOLD_'])"
    )
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    run = [sys.executable, "-c", code]
    out = subprocess.run(run, env=clean, capture_output=True, text=True, check=True).stdout.split()
    assert out == [str(1 << 30)] * 2
    junk = subprocess.run(
        run, env={**clean, "MALLOC_TRIM_THRESHOLD_": "lots"}, capture_output=True, text=True
    )
    assert junk.returncode == 0 and junk.stdout.split() == [str(1 << 30), "lots"]  # left to glibc to ignore
    mine = {**clean, "MALLOC_TRIM_THRESHOLD_": "131072"}
    out = subprocess.run(run, env=mine, capture_output=True, text=True, check=True).stdout.split()
    assert out == [str(1 << 30), "131072"]
    # a user's thresholds of 128 kB are applied: the freed array goes back to the system
    small = probe("on", {"MALLOC_TRIM_THRESHOLD_": "131072", "MALLOC_MMAP_THRESHOLD_": "131072"})
    assert small["during"] - small["after"] > 190
