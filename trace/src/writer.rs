//! The trace writer: an engine observer that buffers rows and writes them through polars.
//!
//! Memory stays bounded: rows are flushed at request boundaries into part files
//! (`<out>.parts/part-<first>-<last>.parquet`, each written under a temporary name and renamed)
//! once the buffer passes a byte budget. Completed parts survive a crash, so `--resume` continues
//! from the request after the last complete part. `finish` streams the parts, one at a time, into
//! `<out>.tmp` with the manifest in the Parquet metadata, renames it to `<out>` and removes the
//! parts: a file with the final name is always complete.

use std::collections::HashSet;
use std::fs::File;
use std::path::{Path, PathBuf};

use polars::prelude::*;
use shadowmoe_engine::observer::{RouteEvent, RoutingObserver};

use crate::schema::*;
use crate::{Result, TraceError};

/// Where and how a collection writes.
#[derive(Debug, Clone)]
pub struct CollectPlan {
    pub out: PathBuf,
    pub manifest: Manifest,
    /// Continue a partial collection found at `<out>.parts`.
    pub resume: bool,
    /// Flush a part once the buffered rows take this many bytes.
    pub flush_bytes: usize,
    /// Also flush after this many requests (0: only by size).
    pub flush_every: usize,
}

/// Column buffers of rows not yet written.
#[derive(Debug, Default)]
struct Rows {
    request: Vec<u32>,
    token: Vec<u32>,
    phase: Vec<u8>,
    layer: Vec<u16>,
    token_id: Vec<u32>,
    /// `[n, k]`.
    experts: Vec<u16>,
    weights: Vec<f32>,
    hidden: Vec<Option<Vec<u8>>>,
    bytes: usize,
}

impl Rows {
    fn len(&self) -> usize {
        self.request.len()
    }

    /// Sorts rows `from..` by (token, layer): the engine reports them layer by layer.
    fn sort_tail(&mut self, from: usize, k: usize) {
        let mut idx: Vec<usize> = (from..self.len()).collect();
        idx.sort_by_key(|&i| (self.token[i], self.layer[i]));
        macro_rules! permute {
            ($v:expr) => {{
                let tail: Vec<_> = idx.iter().map(|&i| $v[i].clone()).collect();
                $v.truncate(from);
                $v.extend(tail);
            }};
        }
        permute!(self.request);
        permute!(self.token);
        permute!(self.phase);
        permute!(self.layer);
        permute!(self.token_id);
        permute!(self.hidden);
        let ex: Vec<u16> = idx
            .iter()
            .flat_map(|&i| self.experts[i * k..(i + 1) * k].to_vec())
            .collect();
        let we: Vec<f32> = idx
            .iter()
            .flat_map(|&i| self.weights[i * k..(i + 1) * k].to_vec())
            .collect();
        self.experts.truncate(from * k);
        self.experts.extend(ex);
        self.weights.truncate(from * k);
        self.weights.extend(we);
    }

    fn frame(&self, k: usize) -> PolarsResult<DataFrame> {
        let n = self.len();
        let mut experts =
            ListPrimitiveChunkedBuilder::<UInt16Type>::new(COL_EXPERTS.into(), n, n * k, DataType::UInt16);
        let mut weights =
            ListPrimitiveChunkedBuilder::<Float32Type>::new(COL_WEIGHTS.into(), n, n * k, DataType::Float32);
        for i in 0..n {
            experts.append_slice(&self.experts[i * k..(i + 1) * k]);
            weights.append_slice(&self.weights[i * k..(i + 1) * k]);
        }
        let hidden =
            BinaryChunked::from_iter_options(COL_HIDDEN.into(), self.hidden.iter().map(|h| h.as_deref()));
        DataFrame::new(
            n,
            vec![
                UInt32Chunked::from_vec(COL_REQUEST.into(), self.request.clone()).into_column(),
                UInt32Chunked::from_vec(COL_TOKEN.into(), self.token.clone()).into_column(),
                UInt8Chunked::from_vec(COL_PHASE.into(), self.phase.clone()).into_column(),
                UInt16Chunked::from_vec(COL_LAYER.into(), self.layer.clone()).into_column(),
                UInt32Chunked::from_vec(COL_TOKEN_ID.into(), self.token_id.clone()).into_column(),
                experts.finish().into_column(),
                weights.finish().into_column(),
                hidden.into_column(),
            ],
        )
    }
}

/// Collects routing rows; an engine [`RoutingObserver`].
#[derive(Debug)]
pub struct TraceWriter {
    out: PathBuf,
    parts: PathBuf,
    manifest: Manifest,
    hidden_layers: HashSet<usize>,
    encoding: HiddenEncoding,
    k: usize,
    /// Position of the request in the collection's work list (parts are named by positions).
    position: u32,
    /// The request's index in the dataset (the `request` column).
    request: u32,
    request_start: usize,
    first_buffered: Option<u32>,
    buffered_requests: usize,
    rows: Rows,
    flush_bytes: usize,
    flush_every: usize,
    /// Rows in parts written so far (this session and before).
    written_rows: u64,
}

/// What `finish` wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FinishSummary {
    pub rows: u64,
    pub bytes: u64,
}

fn parts_dir(out: &Path) -> PathBuf {
    let name = out
        .file_name()
        .map_or("trace".into(), |n| n.to_string_lossy().into_owned());
    out.with_file_name(format!("{name}.parts"))
}

/// Parts in `dir` as (first, last, path), sorted.
fn list_parts(dir: &Path) -> Result<Vec<(u32, u32, PathBuf)>> {
    let mut parts = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| TraceError::io(dir, e))? {
        let path = entry.map_err(|e| TraceError::io(dir, e))?.path();
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if name.ends_with(".tmp") {
            let _ = std::fs::remove_file(&path); // an interrupted part: redone on resume
            continue;
        }
        let Some(range) = name
            .strip_prefix("part-")
            .and_then(|r| r.strip_suffix(".parquet"))
        else {
            continue;
        };
        let mut it = range.split('-').map(|x| x.parse::<u32>());
        if let (Some(Ok(a)), Some(Ok(b))) = (it.next(), it.next()) {
            parts.push((a, b, path));
        }
    }
    parts.sort();
    Ok(parts)
}

impl TraceWriter {
    /// Starts (or, with `plan.resume`, continues) a collection. Returns the writer and the
    /// position (in the work list) of the first request still to collect.
    pub fn create(plan: CollectPlan) -> Result<(Self, u32)> {
        let parts = parts_dir(&plan.out);
        let manifest_path = parts.join("manifest.json");
        let mut first = 0;
        let mut written_rows = 0;
        if parts.exists() {
            if !plan.resume {
                return Err(TraceError::invalid(
                    "--out",
                    format!(
                        "a partial collection exists at {}: pass --resume to continue it, or delete it",
                        parts.display()
                    ),
                ));
            }
            let text =
                std::fs::read_to_string(&manifest_path).map_err(|e| TraceError::io(&manifest_path, e))?;
            let old: Manifest =
                serde_json::from_str(&text).map_err(|e| TraceError::format(&manifest_path, e.to_string()))?;
            if let Some(field) = old.same_collection(&plan.manifest) {
                return Err(TraceError::invalid(
                    "--resume",
                    format!(
                        "the partial collection at {} was made with another {field}",
                        parts.display()
                    ),
                ));
            }
            for (_, last, path) in list_parts(&parts)? {
                first = first.max(last + 1);
                written_rows += part_rows(&path)?;
            }
        } else {
            if let Some(parent) = plan.out.parent().filter(|p| !p.as_os_str().is_empty()) {
                std::fs::create_dir_all(parent).map_err(|e| TraceError::io(parent, e))?;
            }
            std::fs::create_dir(&parts).map_err(|e| TraceError::io(&parts, e))?;
            let text = serde_json::to_string_pretty(&plan.manifest)
                .map_err(|e| TraceError::invalid("manifest", e.to_string()))?;
            std::fs::write(&manifest_path, text).map_err(|e| TraceError::io(&manifest_path, e))?;
        }
        let encoding = HiddenEncoding::parse(&plan.manifest.hidden_encoding).ok_or_else(|| {
            TraceError::invalid(
                "hidden encoding",
                format!("`{}` (expected f32le or f16le)", plan.manifest.hidden_encoding),
            )
        })?;
        let writer = Self {
            encoding,
            hidden_layers: plan.manifest.hidden_layers.iter().copied().collect(),
            k: plan.manifest.top_k,
            out: plan.out,
            parts,
            manifest: plan.manifest,
            position: first,
            request: 0,
            request_start: 0,
            first_buffered: None,
            buffered_requests: 0,
            rows: Rows::default(),
            flush_bytes: plan.flush_bytes.max(1),
            flush_every: plan.flush_every,
            written_rows,
        };
        Ok((writer, first))
    }

    /// Rows from now on belong to the request at `position` of the work list, whose index in
    /// the dataset is `request`. Positions must follow each other from the one `create` gave.
    pub fn begin_request(&mut self, position: u32, request: u32) {
        self.position = position;
        self.request = request;
        self.request_start = self.rows.len();
        self.first_buffered.get_or_insert(position);
    }

    /// The request in progress is complete: its rows may be written.
    pub fn end_request(&mut self) -> Result<()> {
        self.rows.sort_tail(self.request_start, self.k);
        self.buffered_requests += 1;
        let by_count = self.flush_every > 0 && self.buffered_requests >= self.flush_every;
        if self.rows.bytes >= self.flush_bytes || by_count {
            self.flush()?;
        }
        Ok(())
    }

    /// Drops the rows of the request in progress (a failed request is not written).
    pub fn abandon_request(&mut self) {
        let n = self.request_start;
        let k = self.k;
        let r = &mut self.rows;
        r.request.truncate(n);
        r.token.truncate(n);
        r.phase.truncate(n);
        r.layer.truncate(n);
        r.token_id.truncate(n);
        r.experts.truncate(n * k);
        r.weights.truncate(n * k);
        r.hidden.truncate(n);
    }

    /// Rows written or buffered so far.
    pub fn rows(&self) -> u64 {
        self.written_rows + self.rows.len() as u64
    }

    fn flush(&mut self) -> Result<()> {
        let Some(first) = self.first_buffered else {
            return Ok(());
        };
        if self.rows.len() == 0 && self.buffered_requests == 0 {
            return Ok(());
        }
        let last = self.position;
        let path = self.parts.join(format!("part-{first:08}-{last:08}.parquet"));
        let tmp = path.with_extension("parquet.tmp");
        let mut df = self.rows.frame(self.k).map_err(|e| TraceError::polars(&tmp, e))?;
        let file = File::create(&tmp).map_err(|e| TraceError::io(&tmp, e))?;
        ParquetWriter::new(file)
            .with_compression(ParquetCompression::Zstd(None))
            .finish(&mut df)
            .map_err(|e| TraceError::polars(&tmp, e))?;
        std::fs::rename(&tmp, &path).map_err(|e| TraceError::io(&path, e))?;
        self.written_rows += self.rows.len() as u64;
        self.rows = Rows::default();
        self.first_buffered = None;
        self.buffered_requests = 0;
        Ok(())
    }

    /// Writes what is buffered, joins the parts into `<out>` (with the manifest) and removes
    /// them.
    pub fn finish(mut self) -> Result<FinishSummary> {
        self.flush()?;
        let parts = list_parts(&self.parts)?;
        let tmp = self.out.with_extension("parquet.tmp");
        let json = serde_json::to_string(&self.manifest)
            .map_err(|e| TraceError::invalid("manifest", e.to_string()))?;
        let file = File::create(&tmp).map_err(|e| TraceError::io(&tmp, e))?;
        let empty = Rows::default()
            .frame(self.k)
            .map_err(|e| TraceError::polars(&tmp, e))?;
        let mut writer = ParquetWriter::new(file)
            .with_compression(ParquetCompression::Zstd(None))
            .with_key_value_metadata(Some(KeyValueMetadata::from_static(vec![(
                MANIFEST_KEY.into(),
                json,
            )])))
            .batched(empty.schema())
            .map_err(|e| TraceError::polars(&tmp, e))?;
        let mut rows = 0u64;
        let mut next = 0u32;
        for (first, last, path) in &parts {
            if *first != next {
                return Err(TraceError::format(
                    &self.parts,
                    format!(
                        "parts are not contiguous: expected position {next}, found {}",
                        path.display()
                    ),
                ));
            }
            next = last + 1;
            let f = File::open(path).map_err(|e| TraceError::io(path, e))?;
            let df = ParquetReader::new(f)
                .finish()
                .map_err(|e| TraceError::polars(path, e))?;
            rows += df.height() as u64;
            writer.write_batch(&df).map_err(|e| TraceError::polars(&tmp, e))?;
        }
        let bytes = writer.finish().map_err(|e| TraceError::polars(&tmp, e))?;
        std::fs::rename(&tmp, &self.out).map_err(|e| TraceError::io(&self.out, e))?;
        std::fs::remove_dir_all(&self.parts).map_err(|e| TraceError::io(&self.parts, e))?;
        Ok(FinishSummary { rows, bytes })
    }
}

fn part_rows(path: &Path) -> Result<u64> {
    let f = File::open(path).map_err(|e| TraceError::io(path, e))?;
    Ok(ParquetReader::new(f)
        .num_rows()
        .map_err(|e| TraceError::polars(path, e))? as u64)
}

impl RoutingObserver for TraceWriter {
    fn wants_hidden(&self, layer: usize) -> bool {
        self.hidden_layers.contains(&layer)
    }

    fn on_route(&mut self, e: &RouteEvent<'_>) {
        let r = &mut self.rows;
        r.request.push(self.request);
        r.token.push(e.position as u32);
        r.phase.push(e.phase as u8);
        r.layer.push(e.layer as u16);
        r.token_id.push(e.token_id);
        r.experts.extend(e.experts.iter().map(|&x| x as u16));
        r.weights.extend_from_slice(e.weights);
        let hidden = e.hidden.map(|h| self.encoding.encode(h));
        r.bytes += 17 + 6 * e.experts.len() + hidden.as_ref().map_or(0, Vec::len);
        r.hidden.push(hidden);
    }
}
