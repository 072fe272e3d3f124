"""Collects every benchmark's bandwidth and prints one table: GB/s, % of memcpy, x torch-native.

Bytes are those the op must read plus write (ids and weights included); GB/s = bytes / median.
Ratios compare numbers measured in the same run, which is what is meaningful on a shared machine.
"""

from collections import defaultdict

import pytest

RESULTS = defaultdict(dict)  # shape -> case -> (seconds, bytes)


@pytest.fixture
def record(benchmark):
    """Call record(shape, case, bytes) after benchmark(...) has run."""

    def _record(shape, case, nbytes):
        median = benchmark.stats.stats.median
        benchmark.extra_info.update(bytes=nbytes, gbps=nbytes / median / 1e9)
        RESULTS[shape][case] = (median, nbytes)

    return _record


def _row(shape, case, results):
    seconds, nbytes = results[case]
    gbps = nbytes / seconds / 1e9 if nbytes else float("nan")
    memcpy = results.get("memcpy")
    pct = f"{100 * gbps / (memcpy[1] / memcpy[0] / 1e9):6.0f}%" if memcpy and nbytes else "      "
    native_case = {"permute+plan": "native permute", "unpermute": "native unpermute"}.get(case)
    speedup = f"{results[native_case][0] / seconds:5.1f}x" if native_case in results else "      "
    return f"{shape:28s} {case:22s} {seconds * 1e3:9.3f} {gbps:8.1f} {pct:>8s} {speedup:>8s}"


def pytest_terminal_summary(terminalreporter):
    if not RESULTS:
        return
    tr = terminalreporter
    tr.section("grouter op bandwidth (median)")
    tr.write_line(f"{'shape':28s} {'case':22s} {'ms':>9s} {'GB/s':>8s} {'%memcpy':>8s} {'x native':>8s}")
    for shape, results in RESULTS.items():
        for case in results:
            tr.write_line(_row(shape, case, results))
