//! Resolving a `--model` value to a checkpoint directory: a directory as it is, or a hub id
//! (`Org/Name`) that is already in the local Hugging Face cache. No network is ever used.

use std::path::{Path, PathBuf};

use crate::error::{EngineError, Result};

/// The Hugging Face hub cache root: `$HF_HUB_CACHE`, else `$HF_HOME/hub`, else
/// `~/.cache/huggingface/hub`.
pub fn default_hub_cache() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("HF_HUB_CACHE") {
        return Some(PathBuf::from(p));
    }
    if let Some(p) = std::env::var_os("HF_HOME") {
        return Some(PathBuf::from(p).join("hub"));
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/huggingface/hub"))
}

/// Resolves `model` with the default hub cache.
pub fn resolve_model(model: &str) -> Result<PathBuf> {
    resolve_model_in(model, default_hub_cache().as_deref())
}

/// Resolves `model`: an existing directory, or `Org/Name` looked up in `hub_cache`
/// (`models--Org--Name/snapshots/<rev>`, the revision that `refs/main` names, else the only or
/// newest snapshot).
pub fn resolve_model_in(model: &str, hub_cache: Option<&Path>) -> Result<PathBuf> {
    let as_path = Path::new(model);
    if as_path.is_dir() {
        return Ok(as_path.to_path_buf());
    }
    let lookup_err = |message: String| EngineError::ModelLookup {
        id: model.to_string(),
        message,
    };
    let parts: Vec<&str> = model.split('/').collect();
    let is_hub_id = parts.len() == 2 && parts.iter().all(|p| !p.is_empty() && *p != "." && *p != "..");
    if !is_hub_id {
        return Err(lookup_err(
            "not a directory, and not a hub id of the form Org/Name".to_string(),
        ));
    }
    let Some(cache) = hub_cache else {
        return Err(lookup_err(
            "not a directory, and no Hugging Face cache is known (set HF_HOME or HF_HUB_CACHE)".to_string(),
        ));
    };
    let repo = cache.join(format!("models--{}--{}", parts[0], parts[1]));
    let snapshots = repo.join("snapshots");
    if !snapshots.is_dir() {
        return Err(lookup_err(format!(
            "not a directory, and not in the local Hugging Face cache ({} does not exist; no network is used, download it elsewhere or pass a directory)",
            snapshots.display()
        )));
    }
    if let Ok(rev) = std::fs::read_to_string(repo.join("refs/main")) {
        let dir = snapshots.join(rev.trim());
        if dir.is_dir() {
            return Ok(dir);
        }
    }
    let mut revs: Vec<(std::time::SystemTime, PathBuf)> = std::fs::read_dir(&snapshots)
        .map_err(|e| EngineError::io(&snapshots, e))?
        .filter_map(|e| e.ok())
        .filter(|e| e.path().is_dir())
        .map(|e| {
            let t = e
                .metadata()
                .and_then(|m| m.modified())
                .unwrap_or(std::time::UNIX_EPOCH);
            (t, e.path())
        })
        .collect();
    revs.sort();
    revs.pop()
        .map(|(_, p)| p)
        .ok_or_else(|| lookup_err(format!("{} holds no snapshot", snapshots.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hub_id_resolves_through_refs_main() {
        let cache = tempfile::tempdir().unwrap();
        let repo = cache.path().join("models--Org--Tiny");
        std::fs::create_dir_all(repo.join("snapshots/abc123")).unwrap();
        std::fs::create_dir_all(repo.join("snapshots/old999")).unwrap();
        std::fs::create_dir_all(repo.join("refs")).unwrap();
        std::fs::write(repo.join("refs/main"), "abc123\n").unwrap();
        let dir = resolve_model_in("Org/Tiny", Some(cache.path())).unwrap();
        assert_eq!(dir, repo.join("snapshots/abc123"));
    }

    #[test]
    fn missing_hub_id_says_no_network() {
        let cache = tempfile::tempdir().unwrap();
        let err = resolve_model_in("Org/Absent", Some(cache.path()))
            .unwrap_err()
            .to_string();
        assert!(err.contains("model `Org/Absent`"), "{err}");
        assert!(err.contains("no network"), "{err}");
    }

    #[test]
    fn directory_is_taken_as_is() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().to_str().unwrap();
        assert_eq!(resolve_model_in(p, None).unwrap(), d.path());
    }
}
