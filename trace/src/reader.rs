//! Reading traces back: lazily through polars `scan_parquet`, by request and token order,
//! without touching the `hidden` column unless asked.

use std::fs::File;
use std::ops::Range;
use std::path::{Path, PathBuf};

use polars::prelude::*;

use crate::schema::*;
use crate::{Result, TraceError};

/// An opened trace: its path and manifest.
#[derive(Debug, Clone)]
pub struct Trace {
    pub path: PathBuf,
    pub manifest: Manifest,
}

/// The routing of one request: every token at every MoE layer.
///
/// Dimensions: `T` tokens, `L` MoE layers (in [`Manifest::moe_layers`] order), `K` top-k.
#[derive(Debug, Clone, PartialEq)]
pub struct RequestRouting {
    pub request: u32,
    pub k: usize,
    /// Number of MoE layers per token.
    pub layers: usize,
    /// `[T]`.
    pub token_ids: Vec<u32>,
    /// `[T]`: 0 prefill, 1 decode.
    pub phases: Vec<u8>,
    /// `[T, L, K]`, best first.
    pub experts: Vec<u16>,
    /// `[T, L, K]`.
    pub weights: Vec<f32>,
}

impl RequestRouting {
    pub fn tokens(&self) -> usize {
        self.token_ids.len()
    }

    /// Experts of token `t` at MoE layer (ordinal) `l`.
    pub fn experts_at(&self, t: usize, l: usize) -> &[u16] {
        let i = (t * self.layers + l) * self.k;
        &self.experts[i..i + self.k]
    }
}

/// Hidden states of one layer: `[n, H]` f32 with the (request, token) of each row.
#[derive(Debug, Clone, PartialEq)]
pub struct HiddenRows {
    pub hidden_size: usize,
    pub request: Vec<u32>,
    pub token: Vec<u32>,
    pub values: Vec<f32>,
}

impl Trace {
    /// Opens `path` and reads its manifest.
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|e| TraceError::io(path, e))?;
        let len = file.metadata().map_err(|e| TraceError::io(path, e))?.len();
        let mut reader = ParquetReader::new(file);
        // Polars' footer parser panics on some damaged footers (a thrift field of the wrong
        // type: found by fuzzing); that panic becomes this file's error.
        // Every row group's bytes must lie inside the file: Polars' reader trusts the footer's
        // ranges (an unchecked slice: a damaged footer read out of bounds, found by fuzzing).
        let meta = quietly(|| {
            reader.get_metadata().map(|m| {
                let inside = m.row_groups.iter().all(|rg| {
                    std::iter::once(rg.full_byte_range())
                        .chain(rg.byte_ranges_iter())
                        .all(|r| r.start <= r.end && r.end <= len)
                });
                (m.key_value_metadata().clone(), inside)
            })
        });
        let kv = match meta {
            Ok(Ok((_, false))) => {
                return Err(TraceError::format(
                    path,
                    format!(
                        "corrupt Parquet footer: a row group's bytes lie outside the file's {len} bytes (truncated or damaged)"
                    ),
                ));
            }
            Ok(r) => r.map_err(|e| TraceError::polars(path, e))?.0,
            Err(_) => {
                return Err(TraceError::format(
                    path,
                    "corrupt Parquet footer (not a shadowmoe trace, or a damaged one)",
                ));
            }
        };
        let json = kv
            .as_ref()
            .and_then(|kv| kv.iter().find(|k| k.key == MANIFEST_KEY))
            .and_then(|k| k.value.clone())
            .ok_or_else(|| {
                TraceError::format(
                    path,
                    format!("not a shadowmoe trace: no `{MANIFEST_KEY}` in its Parquet metadata"),
                )
            })?;
        let manifest: Manifest = serde_json::from_str(&json)
            .map_err(|e| TraceError::format(path, format!("bad manifest: {e}")))?;
        if manifest.format != TRACE_FORMAT {
            return Err(TraceError::format(
                path,
                format!("format `{}` is not {TRACE_FORMAT}", manifest.format),
            ));
        }
        Ok(Self {
            path: path.to_path_buf(),
            manifest,
        })
    }

    /// A lazy scan of the whole file.
    pub fn scan(&self) -> Result<LazyFrame> {
        let p = PlRefPath::new(self.path.to_string_lossy().as_ref());
        LazyFrame::scan_parquet(p, ScanArgsParquet::default()).map_err(|e| TraceError::polars(&self.path, e))
    }

    /// Routing rows of `requests` (all when `None`), without hidden states, sorted by request,
    /// token and layer.
    pub fn routing_frame(&self, requests: Option<Range<u32>>) -> Result<DataFrame> {
        let mut lf = self.scan()?.select([
            col(COL_REQUEST),
            col(COL_TOKEN),
            col(COL_PHASE),
            col(COL_LAYER),
            col(COL_TOKEN_ID),
            col(COL_EXPERTS),
            col(COL_WEIGHTS),
        ]);
        if let Some(r) = requests {
            lf = lf.filter(
                col(COL_REQUEST)
                    .gt_eq(lit(r.start))
                    .and(col(COL_REQUEST).lt(lit(r.end))),
            );
        }
        collect_guarded(
            &self.path,
            lf.sort(
                [COL_REQUEST, COL_TOKEN, COL_LAYER],
                SortMultipleOptions::default(),
            ),
        )
    }

    /// The routing of `requests` (all when `None`), one [`RequestRouting`] per request.
    pub fn requests(&self, requests: Option<Range<u32>>) -> Result<Vec<RequestRouting>> {
        let df = self.routing_frame(requests)?;
        self.decode(&df)
    }

    /// Calls `f` with batches of at most `batch` requests, in order: bounded memory for traces
    /// larger than RAM.
    pub fn for_each_batch(
        &self,
        batch: u32,
        mut f: impl FnMut(Vec<RequestRouting>) -> Result<()>,
    ) -> Result<()> {
        let n = self.manifest.dataset_requests as u32;
        let mut start = 0;
        while start < n.max(1) {
            let end = (start + batch.max(1)).min(n.max(1));
            let reqs = self.requests(Some(start..end))?;
            if !reqs.is_empty() {
                f(reqs)?;
            }
            start = end;
        }
        Ok(())
    }

    fn decode(&self, df: &DataFrame) -> Result<Vec<RequestRouting>> {
        let bad = |m: String| TraceError::format(&self.path, m);
        let pe = |e: PolarsError| TraceError::polars(&self.path, e);
        let k = self.manifest.top_k;
        let layers = self.manifest.moe_layers.len();
        let n = df.height();
        let u32s = |name: &str| -> Result<Vec<u32>> {
            let c = df
                .column(name)
                .map_err(pe)?
                .as_materialized_series()
                .u32()
                .map_err(pe)?
                .rechunk();
            Ok(c.cont_slice().map_err(pe)?.to_vec())
        };
        let request = u32s(COL_REQUEST)?;
        let token_id = u32s(COL_TOKEN_ID)?;
        let token = u32s(COL_TOKEN)?;
        let phase: Vec<u8> = {
            let c = df
                .column(COL_PHASE)
                .map_err(pe)?
                .as_materialized_series()
                .u8()
                .map_err(pe)?
                .rechunk();
            c.cont_slice().map_err(pe)?.to_vec()
        };
        let explode = |name: &str| -> Result<Series> {
            let list = df
                .column(name)
                .map_err(pe)?
                .as_materialized_series()
                .list()
                .map_err(pe)?
                .clone();
            let (values, _) = list
                .explode_and_offsets(ExplodeOptions {
                    empty_as_null: false,
                    keep_nulls: false,
                })
                .map_err(pe)?;
            if values.len() != n * k {
                return Err(bad(format!(
                    "column `{name}` has {} values for {n} rows of top-{k}",
                    values.len()
                )));
            }
            Ok(values)
        };
        let experts = explode(COL_EXPERTS)?
            .u16()
            .map_err(pe)?
            .rechunk()
            .cont_slice()
            .map_err(pe)?
            .to_vec();
        let weights = explode(COL_WEIGHTS)?
            .f32()
            .map_err(pe)?
            .rechunk()
            .cont_slice()
            .map_err(pe)?
            .to_vec();

        let mut out: Vec<RequestRouting> = Vec::new();
        let mut i = 0;
        while i < n {
            let r = request[i];
            let mut j = i;
            while j < n && request[j] == r {
                j += 1;
            }
            if (j - i) % layers != 0 {
                return Err(bad(format!(
                    "request {r} has {} rows, not a multiple of {layers} MoE layers",
                    j - i
                )));
            }
            let t = (j - i) / layers;
            let mut rr = RequestRouting {
                request: r,
                k,
                layers,
                token_ids: Vec::with_capacity(t),
                phases: Vec::with_capacity(t),
                experts: experts[i * k..j * k].to_vec(),
                weights: weights[i * k..j * k].to_vec(),
            };
            for ti in 0..t {
                let row = i + ti * layers;
                if token[row] as usize != ti {
                    return Err(bad(format!("request {r}: token {ti} is missing")));
                }
                rr.token_ids.push(token_id[row]);
                rr.phases.push(phase[row]);
            }
            out.push(rr);
            i = j;
        }
        Ok(out)
    }

    /// The router inputs stored for model layer `layer` (f16 in the file, f32 here).
    pub fn hidden(&self, layer: usize, requests: Option<Range<u32>>) -> Result<HiddenRows> {
        if !self.manifest.hidden_layers.contains(&layer) {
            return Err(TraceError::invalid(
                "hidden states",
                format!(
                    "{} has none for layer {layer} (it has {:?}); collect them with trace-collect --hidden-layers",
                    self.path.display(),
                    self.manifest.hidden_layers
                ),
            ));
        }
        let mut lf = self.scan()?.filter(col(COL_LAYER).eq(lit(layer as u16))).select([
            col(COL_REQUEST),
            col(COL_TOKEN),
            col(COL_HIDDEN),
        ]);
        if let Some(r) = requests {
            lf = lf.filter(
                col(COL_REQUEST)
                    .gt_eq(lit(r.start))
                    .and(col(COL_REQUEST).lt(lit(r.end))),
            );
        }
        let df = collect_guarded(
            &self.path,
            lf.sort([COL_REQUEST, COL_TOKEN], SortMultipleOptions::default()),
        )?;
        let pe = |e: PolarsError| TraceError::polars(&self.path, e);
        let h = self.manifest.hidden_size;
        let get = |name: &str| -> Result<Vec<u32>> {
            let c = df
                .column(name)
                .map_err(pe)?
                .as_materialized_series()
                .u32()
                .map_err(pe)?
                .rechunk();
            Ok(c.cont_slice().map_err(pe)?.to_vec())
        };
        let (request, token) = (get(COL_REQUEST)?, get(COL_TOKEN)?);
        let bin = df
            .column(COL_HIDDEN)
            .map_err(pe)?
            .as_materialized_series()
            .binary()
            .map_err(pe)?
            .clone();
        let enc = HiddenEncoding::parse(&self.manifest.hidden_encoding).ok_or_else(|| {
            TraceError::format(
                &self.path,
                format!("unknown hidden encoding `{}`", self.manifest.hidden_encoding),
            )
        })?;
        let mut values = Vec::with_capacity(df.height() * h);
        for (i, b) in bin.iter().enumerate() {
            let b = b.ok_or_else(|| {
                TraceError::format(
                    &self.path,
                    format!("request {} token {}: hidden state missing", request[i], token[i]),
                )
            })?;
            if b.len() != enc.width() * h {
                return Err(TraceError::format(
                    &self.path,
                    format!("hidden state of {} bytes, expected {}", b.len(), enc.width() * h),
                ));
            }
            enc.decode_into(b, &mut values);
        }
        Ok(HiddenRows {
            hidden_size: h,
            request,
            token,
            values,
        })
    }
}

/// Runs `lf`. Polars' Parquet decoder panics on some corrupt pages (a bit width out of range:
/// found by fuzzing, experiments/tests/trace_collect.rs) instead of returning an error; that
/// panic becomes this file's error.
fn collect_guarded(path: &Path, lf: LazyFrame) -> Result<DataFrame> {
    match quietly(|| lf.collect()) {
        Ok(r) => r.map_err(|e| TraceError::polars(path, e)),
        Err(_) => Err(TraceError::format(
            path,
            "corrupt Parquet data (the reader gave up decoding a page: a truncated or damaged file)",
        )),
    }
}

/// Runs `f`, catching a panic in it without printing the panic message (the caller turns it
/// into the file's error).
fn quietly<T>(f: impl FnOnce() -> T) -> std::thread::Result<T> {
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    std::panic::set_hook(hook);
    out
}
