//! The rows a running sweep has finished, kept on disk as they finish (`OUT/rows.partial/`, one
//! small JSON file per configuration and repetition, written under a temporary name and
//! renamed), so that `--resume` reads them back instead of running them again. The folder also
//! holds the arguments that decide the rows; a resume with other arguments is refused.

use super::*;

/// The folder of finished rows inside a run folder.
pub(super) const DIR: &str = "rows.partial";
const KEY: &str = "args.json";

/// A run folder's finished rows.
pub(super) struct Partial {
    dir: PathBuf,
}

/// The first flag whose value differs between two `args_json` objects (each with its `shard`),
/// as it is spelt on the command line.
fn first_difference(was: &serde_json::Value, now: &serde_json::Value) -> Option<String> {
    let (Some(was), Some(now)) = (was.as_object(), now.as_object()) else {
        return (was != now).then(|| "arguments".to_string());
    };
    let mut keys: Vec<&String> = was.keys().chain(now.keys()).collect();
    keys.sort();
    keys.dedup();
    keys.into_iter()
        .find(|k| was.get(*k) != now.get(*k))
        .map(|k| format!("--{}", k.replace('_', "-")))
}

/// Refuses a resume whose arguments (`key`: `args_json` and the shard) differ from `was`, the
/// ones the rows in `what` were written with.
pub(super) fn check_same(was: &serde_json::Value, key: &serde_json::Value, what: &Path) -> Result<()> {
    if let Some(flag) = first_difference(was, key) {
        bail!(
            "--resume: {} was written with another {flag} than this command's (pass the same arguments, or --replace to start over)",
            what.display()
        );
    }
    Ok(())
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot rename {} into place", tmp.display()))
}

impl Partial {
    /// Opens `out`'s finished rows: with `resume`, those already there (after checking they
    /// were written with `key`), else an empty folder (any rows of an earlier try removed).
    pub(super) fn open(out: &Path, key: &serde_json::Value, resume: bool) -> Result<Self> {
        let dir = out.join(DIR);
        let key_path = dir.join(KEY);
        if resume && key_path.exists() {
            let text = std::fs::read_to_string(&key_path)
                .with_context(|| format!("--resume: cannot read {}", key_path.display()))?;
            let was: serde_json::Value = serde_json::from_str(&text)
                .with_context(|| format!("--resume: {} is not a sweep's arguments", key_path.display()))?;
            check_same(&was, key, &dir)?;
            return Ok(Partial { dir });
        }
        if dir.exists() {
            std::fs::remove_dir_all(&dir).with_context(|| format!("cannot remove {}", dir.display()))?;
        }
        std::fs::create_dir_all(&dir).with_context(|| format!("--out: cannot create {}", dir.display()))?;
        write_atomic(&key_path, serde_json::to_string_pretty(key)?.as_bytes())?;
        Ok(Partial { dir })
    }

    fn path(&self, rep: usize, combo: usize) -> PathBuf {
        self.dir.join(format!("{rep}-{combo}.json"))
    }

    /// Repetition `rep` of configuration `combo` (its index among all the sweep's), if an
    /// earlier try finished it.
    pub(super) fn load(&self, rep: usize, combo: usize) -> Result<Option<Row>> {
        let path = self.path(rep, combo);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).with_context(|| format!("--resume: cannot read {}", path.display())),
        };
        let row = serde_json::from_str(&text).with_context(|| {
            format!(
                "--resume: {} is not a sweep row (delete it to run that configuration again)",
                path.display()
            )
        })?;
        Ok(Some(row))
    }

    /// Keeps a finished row.
    pub(super) fn store(&self, rep: usize, combo: usize, row: &Row) -> Result<()> {
        write_atomic(&self.path(rep, combo), serde_json::to_string(row)?.as_bytes())
    }

    /// Removes the folder (once the final files are in place).
    pub(super) fn remove(self) -> Result<()> {
        std::fs::remove_dir_all(&self.dir).with_context(|| format!("cannot remove {}", self.dir.display()))
    }
}
