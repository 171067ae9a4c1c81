"""The benchmark's own settings (experiments/bench/benchmark.py); the timings are not tested."""
import sys

import pytest

bm = pytest.importorskip("experiments.bench.benchmark")


def test_host_allocator_is_pinned_by_default_and_can_be_left_alone():
    assert bm.parse([]).malloc == "pinned"
    assert bm.parse(["--malloc", "default"]).malloc == "default"
    with pytest.raises(SystemExit):
        bm.parse(["--malloc", "tcmalloc"])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_pin_malloc_reports_what_it_did():
    done = bm.pin_malloc()
    assert done.startswith("pinned (mallopt") or done.startswith("default (no glibc"), done
