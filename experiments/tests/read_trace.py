#!/usr/bin/env python3
"""A second reader for shadowmoe traces: pyarrow (no polars). Prints a JSON summary that the
Rust tests compare with what polars and the trace crate read.

    python3 experiments/tests/read_trace.py traces/X.parquet
"""
import json
import sys

import numpy as np
import pyarrow.parquet as pq

path = sys.argv[1]
pf = pq.ParquetFile(path)
meta = pf.metadata.metadata or {}
manifest = json.loads(meta[b"shadowmoe.manifest"])
table = pf.read()
cols = {f.name: str(f.type) for f in table.schema}
experts = table.column("experts").combine_chunks()
weights = table.column("weights").combine_chunks()
hidden = table.column("hidden").to_pylist()
first_hidden = next((h for h in hidden if h is not None), None)
print(json.dumps({
    "rows": table.num_rows,
    "columns": cols,
    "manifest_model": manifest["model_id"],
    "manifest_requests": manifest["requests"],
    "sum_token_id": int(np.sum(table.column("token_id").to_numpy())),
    "sum_experts": int(np.sum(experts.flatten().to_numpy())),
    "sum_weights": float(np.sum(weights.flatten().to_numpy(), dtype=np.float64)),
    "hidden_rows": sum(h is not None for h in hidden),
    "first_hidden": None if first_hidden is None else np.frombuffer(first_hidden, dtype="<f2").astype(float)[:4].tolist(),
}))
