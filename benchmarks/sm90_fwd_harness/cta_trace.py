"""Summarize CTA traces of the Hopper forward: where each CTA's time goes and how evenly the SMs end.

usage: python cta_trace.py TRACE.csv...   (written by a harness built with cta_trace.patch applied
and HARNESS_FLAGS=-DJAX_FLASH_CTA_TRACE, run with CTA_TRACE=TRACE.csv)

Per CTA the trace holds its SM, key tiles and four %globaltimer stamps (ns, 32 ns steps) taken by
the first consumer thread: start, Q landed, main loop done, epilogue done. The fit of CTA time
against key tiles gives the cost per tile and the fixed cost per CTA; the SMs' busy time against
the span shows what the order of the CTAs loses to the last ones.
"""
import sys

import numpy as np


def summarize(path: str) -> str:
    trace = np.genfromtxt(path, delimiter=",", names=True, dtype=np.int64)
    t = [trace[f"t{i}"] / 1e3 for i in range(4)]  # µs
    tiles, sm = trace["tiles"], trace["sm"]
    duration = t[3] - t[0]
    per_tile, fixed = np.polyfit(tiles, duration, 1) if np.ptp(tiles) else (np.nan, np.nan)
    busy = np.bincount(sm, weights=duration)
    sm_end = np.array([t[3][sm == s].max() for s in np.unique(sm)]) - t[0].min()
    span = t[3].max() - t[0].min()
    # Time between a CTA's end and the next start on the same SM (launch and setup).
    order = np.lexsort((t[0], sm))
    same_sm = sm[order][1:] == sm[order][:-1]
    gaps = (t[0][order][1:] - t[3][order][:-1])[same_sm]
    return (f"{path}: {len(tiles)} CTAs, span {span:.1f} µs | per CTA: Q wait {np.mean(t[1] - t[0]):.2f}, "
            f"epilogue {np.mean(t[3] - t[2]):.2f}, main loop {np.mean((t[2] - t[1]) / np.maximum(tiles, 1)):.3f}"
            f"/tile; fit {fixed:.2f} + {per_tile:.3f}/tile; gap to next CTA {np.median(gaps):.2f} | "
            f"SM busy mean {busy.mean():.1f} (span / mean {span / busy.mean():.3f}), SM end min "
            f"{sm_end.min():.1f} median {np.median(sm_end):.1f} max {sm_end.max():.1f}")


if __name__ == "__main__":
    for trace_path in sys.argv[1:]:
        print(summarize(trace_path))
