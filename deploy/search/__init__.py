"""The build's search, pure and torch-free: statistics (``stats``), the latency model (``latency``),
candidates and the measure-until-decided loop (``judge``), the search and verification (``searcher``)."""

from prune_pack.deploy.search.judge import Candidate, Judge, Record, SearchState
from prune_pack.deploy.search.latency import LatencyModel
from prune_pack.deploy.search.searcher import (
    MET, UNDECIDED, UNREACHABLE, SearchResult, Verification, guess_index, lever_name, search, verify,
)
from prune_pack.deploy.search.stats import (
    BUDGET, FAIL, NOISY, PASS, PERCENTILES, UNSURE, WIDE, Measurement, agree, combined, decide, point_estimate, pool,
)

__all__ = [
    "BUDGET", "FAIL", "MET", "NOISY", "PASS", "PERCENTILES", "UNDECIDED", "UNREACHABLE", "UNSURE", "WIDE",
    "Candidate", "Judge", "LatencyModel", "Measurement", "Record", "SearchResult", "SearchState", "Verification",
    "agree", "combined", "decide", "guess_index", "lever_name", "point_estimate", "pool", "search", "verify",
]
