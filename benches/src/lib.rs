//! Benchmarks live in `benches/`; each prints a table next to a baseline measured in the same run.
