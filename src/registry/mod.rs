//! The versioned model repository on disk:
//!
//! ```text
//! <root>/<name>/<version>/model.onnx
//! <root>/<name>/<version>/manifest.json
//! <root>/<name>/pinned              optional: the default version, else the latest
//! ```
//!
//! Names are checked so a name is never a path; nothing under the root may be a
//! symlink; a version is written in a temporary directory and renamed into place, so
//! readers never see half a version and two concurrent adds get distinct versions.
//! ONNX Runtime is not called here: `add` takes the signature reader as an argument.

mod cache;
pub mod manifest;
mod onnx;

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

pub use cache::RegistryCache;
pub use manifest::{Batching, Manifest};
pub use onnx::check_no_external_data;

use crate::runtime::Signature;

const MODEL_FILE: &str = "model.onnx";
const MANIFEST_FILE: &str = "manifest.json";
const PIN_FILE: &str = "pinned";

/// Registry failures; each names the model, version or file concerned.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// A name that is not `^[a-z0-9][a-z0-9._-]{0,63}$`.
    #[error(
        "invalid model name `{0}`: use 1-64 characters of a-z 0-9 . _ - starting with a letter or digit"
    )]
    InvalidName(String),
    /// No such model.
    #[error("unknown model `{0}`")]
    UnknownModel(String),
    /// No such version.
    #[error("model `{0}` has no version {1}")]
    UnknownVersion(String, u64),
    /// The file on disk is not what was registered.
    #[error(
        "model {model}@{version}: {file} does not match its manifest (sha256 {actual}, expected {expected}); refusing to load it"
    )]
    HashMismatch {
        /// Model name.
        model: String,
        /// Version.
        version: u64,
        /// The file checked.
        file: String,
        /// sha256 of the bytes on disk.
        actual: String,
        /// sha256 in the manifest.
        expected: String,
    },
    /// A refused operation or file (symlink, external data, not ONNX, version exists …).
    #[error("{0}")]
    Refused(String),
    /// A filesystem error on a named path.
    #[error("{path}: {source}")]
    Io {
        /// The path.
        path: String,
        /// The OS error.
        source: io::Error,
    },
}

type Result<T> = std::result::Result<T, RegistryError>;

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> RegistryError + '_ {
    move |source| RegistryError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// True for `^[a-z0-9][a-z0-9._-]{0,63}$`: never a path, never `..`.
pub fn valid_name(name: &str) -> bool {
    let b = name.as_bytes();
    (1..=64).contains(&b.len())
        && (b[0].is_ascii_lowercase() || b[0].is_ascii_digit())
        && b.iter().all(|&c| {
            c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, b'.' | b'_' | b'-')
        })
}

/// Hex sha256.
pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// File holding the highest version ever assigned to a model, so a removed version's
/// number is never reused (a worker caches loaded versions by number).
const HIGH_WATER_FILE: &str = "high_water";

fn high_water(dir: &Path) -> u64 {
    std::fs::read_to_string(dir.join(HIGH_WATER_FILE))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

/// Raises the high-water mark (best effort: a lost update only risks reuse after a
/// concurrent add and remove, and the rename race is settled by the version directory).
fn record_high_water(dir: &Path, version: u64) {
    if high_water(dir) < version {
        let tmp = dir.join(format!(".hw-{:016x}", rand::random::<u64>()));
        if std::fs::write(&tmp, version.to_string()).is_ok()
            && std::fs::rename(&tmp, dir.join(HIGH_WATER_FILE)).is_err()
        {
            let _ = std::fs::remove_file(&tmp);
        }
    }
}

/// One model in a listing.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ModelSummary {
    /// Model name.
    pub name: String,
    /// Versions, ascending.
    pub versions: Vec<u64>,
    /// The version a job without one gets.
    pub default: u64,
    /// True when `default` is pinned rather than the latest.
    pub pinned: bool,
    /// The default version's manifest.
    pub manifest: Manifest,
}

/// What to register.
#[derive(Debug, Clone, Default)]
pub struct NewVersion {
    /// Explicit version; `None` takes the next free one.
    pub version: Option<u64>,
    /// Free-form metadata.
    pub metadata: BTreeMap<String, String>,
    /// Batching overrides.
    pub batching: Option<Batching>,
    /// Padding declaration, checked against the model's signature before anything is
    /// written.
    pub padding: Option<crate::runtime::Padding>,
}

/// A handle on a registry directory.
#[derive(Debug, Clone)]
pub struct Registry {
    root: PathBuf,
}

impl Registry {
    /// A registry rooted at `root` (created on first add).
    pub fn new(root: impl Into<PathBuf>) -> Registry {
        Registry { root: root.into() }
    }

    fn model_dir(&self, name: &str) -> Result<PathBuf> {
        if !valid_name(name) {
            return Err(RegistryError::InvalidName(name.to_owned()));
        }
        let dir = self.root.join(name);
        // Every operation starts here: refuse a symlinked model directory before
        // anything is read, written or deleted through it (rm would delete elsewhere).
        if std::fs::symlink_metadata(&dir).is_ok_and(|m| m.file_type().is_symlink()) {
            return Err(RegistryError::Refused(format!(
                "{} is a symlink; the registry refuses symlinks",
                dir.display()
            )));
        }
        Ok(dir)
    }

    /// Fails unless `path` is a real directory or file (not a symlink) under the root.
    fn no_symlink(path: &Path) -> Result<()> {
        let meta = std::fs::symlink_metadata(path).map_err(io_err(path))?;
        if meta.file_type().is_symlink() {
            return Err(RegistryError::Refused(format!(
                "{} is a symlink; the registry refuses symlinks",
                path.display()
            )));
        }
        Ok(())
    }

    /// Registers `file` as a new version of `name`. `inspect` reads the signature
    /// (through ONNX Runtime) and fails for files that are not loadable models.
    pub fn add(
        &self,
        file: &Path,
        name: &str,
        new: NewVersion,
        inspect: impl FnOnce(&[u8]) -> std::result::Result<Signature, String>,
    ) -> Result<Manifest> {
        let dir = self.model_dir(name)?;
        let bytes = std::fs::read(file).map_err(io_err(file))?;
        let refuse =
            |why: String| RegistryError::Refused(format!("cannot add {}: {why}", file.display()));
        check_no_external_data(&bytes).map_err(refuse)?;
        let signature = inspect(&bytes).map_err(refuse)?;
        if let Some(p) = &new.padding {
            p.validate(&signature).map_err(refuse)?;
        }
        std::fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        Self::no_symlink(&dir)?;
        let tmp = dir.join(format!(".tmp-{:016x}", rand::random::<u64>()));
        std::fs::create_dir(&tmp).map_err(io_err(&tmp))?;
        let result = self.publish(&tmp, &dir, name, &bytes, signature, new);
        let _ = std::fs::remove_dir_all(&tmp);
        result
    }

    fn publish(
        &self,
        tmp: &Path,
        dir: &Path,
        name: &str,
        bytes: &[u8],
        signature: Signature,
        new: NewVersion,
    ) -> Result<Manifest> {
        let model_path = tmp.join(MODEL_FILE);
        std::fs::write(&model_path, bytes).map_err(io_err(&model_path))?;
        let mut manifest = Manifest {
            name: name.to_owned(),
            version: 0,
            sha256: sha256_hex(bytes),
            size: bytes.len() as u64,
            created_ms: crate::now_ms(),
            signature,
            metadata: new.metadata,
            batching: new.batching,
            padding: new.padding,
        };
        // Rename fails when the target version exists (it is never empty), so racing
        // adds each land on their own version number.
        for _ in 0..1000 {
            let version = match new.version {
                Some(v) => v,
                None => {
                    self.versions(name)?
                        .last()
                        .copied()
                        .unwrap_or(0)
                        .max(high_water(dir))
                        + 1
                }
            };
            if version == 0 {
                return Err(RegistryError::Refused(
                    "versions are positive integers".into(),
                ));
            }
            manifest.version = version;
            let mpath = tmp.join(MANIFEST_FILE);
            let json = serde_json::to_vec_pretty(&manifest)
                .expect("a manifest always serializes, this is a bug");
            std::fs::write(&mpath, json).map_err(io_err(&mpath))?;
            let target = dir.join(version.to_string());
            match std::fs::rename(tmp, &target) {
                Ok(()) => {
                    record_high_water(dir, version);
                    return Ok(manifest);
                }
                Err(_) if target.exists() && new.version.is_none() => {}
                Err(_) if target.exists() => {
                    return Err(RegistryError::Refused(format!(
                        "model `{name}` already has version {version}"
                    )));
                }
                Err(e) => return Err(io_err(&target)(e)),
            }
        }
        Err(RegistryError::Refused(format!(
            "model `{name}`: could not find a free version number"
        )))
    }

    /// Model names, sorted.
    pub fn names(&self) -> Result<Vec<String>> {
        let entries = match std::fs::read_dir(&self.root) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io_err(&self.root)(e)),
        };
        let mut names: Vec<String> = entries
            .filter_map(|e| e.ok())
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|n| valid_name(n))
            .collect();
        names.sort();
        Ok(names)
    }

    /// A model's versions, ascending; `UnknownModel` when it has none.
    pub fn versions(&self, name: &str) -> Result<Vec<u64>> {
        let dir = self.model_dir(name)?;
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io_err(&dir)(e)),
        };
        let mut versions: Vec<u64> = entries
            .filter_map(|e| e.ok())
            .filter_map(|e| e.file_name().into_string().ok()?.parse::<u64>().ok())
            .filter(|&v| v > 0)
            .collect();
        versions.sort_unstable();
        Ok(versions)
    }

    fn pinned(&self, name: &str) -> Result<Option<u64>> {
        let path = self.model_dir(name)?.join(PIN_FILE);
        match std::fs::read_to_string(&path) {
            Ok(s) => Ok(s.trim().parse().ok()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_err(&path)(e)),
        }
    }

    /// The version a job without one gets: the pinned one, else the latest.
    pub fn default_version(&self, name: &str) -> Result<u64> {
        if let Some(v) = self.pinned(name)? {
            return Ok(v);
        }
        self.versions(name)?
            .last()
            .copied()
            .ok_or_else(|| RegistryError::UnknownModel(name.to_owned()))
    }

    /// The manifest of `name` at `version`, or at its default.
    pub fn manifest(&self, name: &str, version: Option<u64>) -> Result<Manifest> {
        let version = match version {
            Some(v) => v,
            None => self.default_version(name)?,
        };
        let dir = self.model_dir(name)?.join(version.to_string());
        if !dir.is_dir() {
            return Err(if self.versions(name)?.is_empty() {
                RegistryError::UnknownModel(name.to_owned())
            } else {
                RegistryError::UnknownVersion(name.to_owned(), version)
            });
        }
        let path = dir.join(MANIFEST_FILE);
        Self::no_symlink(&path)?;
        let text = std::fs::read(&path).map_err(io_err(&path))?;
        serde_json::from_slice(&text).map_err(|e| {
            RegistryError::Refused(format!("{}: not a valid manifest: {e}", path.display()))
        })
    }

    /// Every model with its versions and default.
    pub fn list(&self) -> Result<Vec<ModelSummary>> {
        let mut out = Vec::new();
        for name in self.names()? {
            let versions = self.versions(&name)?;
            if versions.is_empty() {
                continue;
            }
            let pinned = self.pinned(&name)?;
            let default = pinned.unwrap_or(*versions.last().expect("non-empty, this is a bug"));
            let manifest = self.manifest(&name, Some(default))?;
            out.push(ModelSummary {
                name,
                versions,
                default,
                pinned: pinned.is_some(),
                manifest,
            });
        }
        Ok(out)
    }

    /// Reads a version's bytes and checks them against the manifest hash. The returned
    /// bytes are the ones hashed: hand exactly these to ORT, never re-open the file.
    pub fn load(&self, name: &str, version: Option<u64>) -> Result<(Manifest, Vec<u8>)> {
        let manifest = self.manifest(name, version)?;
        let dir = self.model_dir(name)?;
        let vdir = dir.join(manifest.version.to_string());
        let path = vdir.join(MODEL_FILE);
        for p in [&dir, &vdir, &path] {
            Self::no_symlink(p)?;
        }
        let bytes = std::fs::read(&path).map_err(io_err(&path))?;
        let actual = sha256_hex(&bytes);
        if actual != manifest.sha256 {
            return Err(RegistryError::HashMismatch {
                model: name.to_owned(),
                version: manifest.version,
                file: format!("{name}/{}/{MODEL_FILE}", manifest.version),
                actual,
                expected: manifest.sha256,
            });
        }
        Ok((manifest, bytes))
    }

    /// Checks every version's hash (of one model, or all); one entry per version.
    pub fn verify(&self, name: Option<&str>) -> Result<Vec<(String, u64, Result<()>)>> {
        let names = match name {
            Some(n) => {
                if self.versions(n)?.is_empty() {
                    return Err(RegistryError::UnknownModel(n.to_owned()));
                }
                vec![n.to_owned()]
            }
            None => self.names()?,
        };
        let mut out = Vec::new();
        for n in names {
            for v in self.versions(&n)? {
                let r = self.load(&n, Some(v)).map(drop);
                out.push((n.clone(), v, r));
            }
        }
        Ok(out)
    }

    /// Makes `version` the default of `name`.
    pub fn pin(&self, name: &str, version: u64) -> Result<()> {
        self.manifest(name, Some(version))?;
        let dir = self.model_dir(name)?;
        let tmp = dir.join(format!(".pin-{:016x}", rand::random::<u64>()));
        std::fs::write(&tmp, version.to_string()).map_err(io_err(&tmp))?;
        let path = dir.join(PIN_FILE);
        std::fs::rename(&tmp, &path).map_err(io_err(&path))
    }

    /// Deletes one version; the pinned version cannot be deleted.
    pub fn remove(&self, name: &str, version: u64) -> Result<()> {
        self.manifest(name, Some(version))?;
        if self.pinned(name)? == Some(version) {
            return Err(RegistryError::Refused(format!(
                "model `{name}` version {version} is pinned as the default; pin another version first"
            )));
        }
        let vdir = self.model_dir(name)?.join(version.to_string());
        // Rename first so readers never see a half-deleted version.
        let trash = self
            .model_dir(name)?
            .join(format!(".rm-{version}-{:016x}", rand::random::<u64>()));
        std::fs::rename(&vdir, &trash).map_err(io_err(&vdir))?;
        std::fs::remove_dir_all(&trash).map_err(io_err(&trash))
    }

    /// Keeps the newest `keep` versions (and the pinned one); returns what was deleted.
    pub fn prune(&self, name: &str, keep: usize) -> Result<Vec<u64>> {
        let versions = self.versions(name)?;
        if versions.is_empty() {
            return Err(RegistryError::UnknownModel(name.to_owned()));
        }
        let pinned = self.pinned(name)?;
        let cut = versions.len().saturating_sub(keep);
        let mut removed = Vec::new();
        for &v in &versions[..cut] {
            if Some(v) != pinned {
                self.remove(name, v)?;
                removed.push(v);
            }
        }
        Ok(removed)
    }
}
