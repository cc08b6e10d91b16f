//! Templates the daemon serves: specs found in its template directories, built into images
//! (cached by `kiln-image`) and baked by the engine the first time a sandbox needs them.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use kiln_engine::{BakedTemplate, Engine};
use kiln_image::cache::Cache;
use kiln_image::progress::{BuildEvent, Progress};
use kiln_image::spec::TemplateSpec;

use crate::ControlError;

/// A template as listed.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct TemplateInfo {
    /// Its name.
    pub name: String,
    /// What it is.
    pub description: Option<String>,
    /// Virtual CPUs of its sandboxes.
    pub vcpus: u32,
    /// Guest memory of its sandboxes.
    pub memory_mib: u32,
    /// Root disk of its sandboxes.
    pub disk_mib: u64,
    /// Baked and ready to restore (else the next create builds and bakes it).
    pub ready: bool,
    /// Visible to every tenant.
    pub global: bool,
}

/// Logs image-build progress.
#[derive(Debug)]
struct LogProgress;

impl Progress for LogProgress {
    fn event(&self, event: BuildEvent) {
        tracing::info!(?event, "template build");
    }
}

type BakeCell = Arc<tokio::sync::OnceCell<BakedTemplate>>;

/// The template registry.
#[derive(Debug)]
pub struct Templates {
    dirs: Vec<PathBuf>,
    cache: Cache,
    agent: PathBuf,
    baked: Mutex<HashMap<String, BakeCell>>,
}

/// Whether `name` can name a template (and so a directory).
pub fn valid_name(name: &str) -> bool {
    let bytes = name.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= 63
        && bytes[0].is_ascii_alphanumeric()
        && bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-' || *b == b'_')
}

impl Templates {
    /// Templates from `dirs` (each holding `<name>/template.toml`), built with `agent` into
    /// `cache`.
    pub fn new(dirs: Vec<PathBuf>, cache: Cache, agent: PathBuf) -> Templates {
        Templates {
            dirs,
            cache,
            agent,
            baked: Mutex::new(HashMap::new()),
        }
    }

    fn spec_path(&self, name: &str) -> Result<PathBuf, ControlError> {
        if !valid_name(name) {
            return Err(ControlError::Invalid(format!(
                "`{name}` is not a template name (lowercase letters, digits, `-` and `_`)"
            )));
        }
        self.dirs
            .iter()
            .map(|dir| dir.join(name).join("template.toml"))
            .find(|path| path.is_file())
            .ok_or_else(|| ControlError::NotFound {
                what: "template",
                id: name.to_owned(),
            })
    }

    fn cell(&self, name: &str) -> BakeCell {
        self.baked
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(name.to_owned())
            .or_default()
            .clone()
    }

    /// Every template.
    pub fn list(&self) -> Vec<TemplateInfo> {
        let mut names: Vec<String> = self
            .dirs
            .iter()
            .filter_map(|dir| std::fs::read_dir(dir).ok())
            .flatten()
            .flatten()
            .filter(|entry| entry.path().join("template.toml").is_file())
            .map(|entry| entry.file_name().to_string_lossy().into_owned())
            .filter(|name| valid_name(name))
            .collect();
        names.sort();
        names.dedup();
        names
            .iter()
            .filter_map(|name| self.get(name).ok())
            .collect()
    }

    /// Template `name`.
    pub fn get(&self, name: &str) -> Result<TemplateInfo, ControlError> {
        let path = self.spec_path(name)?;
        let spec = TemplateSpec::from_file(&path)
            .map_err(|e| ControlError::Internal(format!("template `{name}`: {e}")))?;
        Ok(TemplateInfo {
            name: name.to_owned(),
            description: spec.description,
            vcpus: spec.resources.vcpus,
            memory_mib: spec.resources.memory_mib,
            disk_mib: u64::from(spec.resources.disk_mib),
            ready: self.cell(name).initialized(),
            global: true,
        })
    }

    /// The baked snapshot of `name`: built and baked on first use (concurrent callers wait for
    /// the same bake), then kept; a failed bake is retried by the next call.
    pub async fn baked(&self, engine: &Engine, name: &str) -> Result<BakedTemplate, ControlError> {
        let path = self.spec_path(name)?;
        let cell = self.cell(name);
        let baked = cell
            .get_or_try_init(|| async {
                tracing::info!(template = name, "building and baking");
                let (cache, agent) = (self.cache.clone(), self.agent.clone());
                let images = tokio::task::spawn_blocking(move || {
                    kiln_image::template::build_template(&path, &agent, &cache, &LogProgress)
                })
                .await
                .map_err(|e| ControlError::Internal(format!("template build task: {e}")))?
                .map_err(|e| ControlError::Internal(format!("building template `{name}`: {e}")))?;
                let baked = engine.bake(&images).await.map_err(|e| {
                    ControlError::Internal(format!("baking template `{name}`: {e}"))
                })?;
                baked
                    .verify_memory()
                    .map_err(|e| ControlError::Internal(format!("template `{name}`: {e}")))?;
                engine.prestart(&baked);
                Ok::<_, ControlError>(baked)
            })
            .await?;
        Ok(baked.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_plain() {
        for good in ["base", "python", "py-3_12", "0day"] {
            assert!(valid_name(good), "{good}");
        }
        for bad in [
            "",
            "../etc",
            "Base",
            "a/b",
            "-x",
            ".hidden",
            &"x".repeat(64),
        ] {
            assert!(!valid_name(bad), "{bad}");
        }
    }

    #[test]
    fn templates_are_found_in_the_directories() {
        let dir = tempfile::tempdir().expect("dir");
        std::fs::create_dir_all(dir.path().join("tiny")).expect("mkdir");
        std::fs::write(
            dir.path().join("tiny/template.toml"),
            "name = \"tiny\"\ndescription = \"small\"\n[base]\nsuite = \"bookworm\"\n[resources]\nvcpus = 1\nmemory_mib = 128\ndisk_mib = 512\n",
        )
        .expect("write");
        std::fs::create_dir_all(dir.path().join("not-a-template")).expect("mkdir");
        let templates = Templates::new(
            vec![dir.path().to_owned()],
            Cache::new(dir.path().join("cache")),
            dir.path().join("agent"),
        );
        let listed = templates.list();
        assert_eq!(listed.len(), 1, "{listed:?}");
        assert_eq!(listed[0].name, "tiny");
        assert!(!listed[0].ready);
        assert!(matches!(
            templates.get("missing"),
            Err(ControlError::NotFound { .. })
        ));
        assert!(matches!(
            templates.get("../tiny"),
            Err(ControlError::Invalid(_))
        ));
    }
}
