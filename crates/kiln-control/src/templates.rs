//! Templates the daemon serves: global specs found in its template directories, and each
//! tenant's own specs submitted through the API; built into images (cached by `kiln-image`)
//! and baked by the engine the first time a sandbox needs them (or when built on request).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use kiln_engine::{BakedTemplate, Engine};
use kiln_image::cache::Cache;
use kiln_image::error::ImageError;
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
    /// Visible to every tenant (else the caller's own).
    pub global: bool,
}

/// Logs image-build progress (and forwards it, when someone is watching).
struct Forward(Option<Arc<dyn Progress>>);

impl Progress for Forward {
    fn event(&self, event: BuildEvent) {
        tracing::info!(?event, "template build");
        if let Some(sink) = &self.0 {
            sink.event(event);
        }
    }
}

type BakeCell = Arc<tokio::sync::OnceCell<BakedTemplate>>;

/// Where a template's spec lives, and whose it is.
#[derive(Debug, Clone)]
struct Located {
    spec: PathBuf,
    /// `None` for a global template.
    tenant: Option<String>,
}

/// The template registry.
#[derive(Debug)]
pub struct Templates {
    dirs: Vec<PathBuf>,
    tenant_root: PathBuf,
    cache: Cache,
    agent: PathBuf,
    baked: Mutex<HashMap<(Option<String>, String), BakeCell>>,
    /// Templates made ready (built and baked, or their bake found on disk), and attempts
    /// that failed.
    prepared: [std::sync::atomic::AtomicU64; 2],
    /// What a tenant's template may ask for, and how long its build may take.
    caps: crate::SpecCaps,
    /// Held while a spec is saved: the count of a tenant's templates and the write are one.
    saving: Mutex<()>,
}

/// Whether `name` can name a template, a tenant (and so a directory).
pub fn valid_name(name: &str) -> bool {
    let bytes = name.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= 63
        && bytes[0].is_ascii_alphanumeric()
        && bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-' || *b == b'_')
}

fn check_name(name: &str) -> Result<(), ControlError> {
    if valid_name(name) {
        Ok(())
    } else {
        Err(ControlError::Invalid(format!(
            "`{name}` is not a template name (lowercase letters, digits, `-` and `_`)"
        )))
    }
}

impl Templates {
    /// Global templates from `dirs` (each holding `<name>/template.toml`), tenants' own under
    /// `tenant_root/<tenant>/<name>/`, built with `agent` into `cache`.
    pub fn new(
        dirs: Vec<PathBuf>,
        tenant_root: PathBuf,
        cache: Cache,
        agent: PathBuf,
        caps: crate::SpecCaps,
    ) -> Templates {
        Templates {
            dirs,
            tenant_root,
            cache,
            agent,
            baked: Mutex::new(HashMap::new()),
            prepared: Default::default(),
            caps,
            saving: Mutex::new(()),
        }
    }

    fn global(&self, name: &str) -> Option<PathBuf> {
        kiln_image::spec::find_named(&self.dirs, name)
    }

    fn own(&self, tenant: &str, name: &str) -> PathBuf {
        self.tenant_root
            .join(tenant)
            .join(name)
            .join(kiln_image::spec::SPEC_FILE)
    }

    /// The template `name` as `tenant` sees it: its own first, then the global one.
    fn locate(&self, tenant: &str, name: &str) -> Result<Located, ControlError> {
        check_name(name)?;
        let own = self.own(tenant, name);
        if own.is_file() {
            return Ok(Located {
                spec: own,
                tenant: Some(tenant.to_owned()),
            });
        }
        self.global(name)
            .map(|spec| Located { spec, tenant: None })
            .ok_or_else(|| ControlError::NotFound {
                what: "template",
                id: name.to_owned(),
            })
    }

    fn cell(&self, located: &Located, name: &str) -> BakeCell {
        self.baked
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry((located.tenant.clone(), name.to_owned()))
            .or_default()
            .clone()
    }

    fn names_in(dir: &std::path::Path) -> Vec<String> {
        std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|entry| entry.path().join(kiln_image::spec::SPEC_FILE).is_file())
            .map(|entry| entry.file_name().to_string_lossy().into_owned())
            .filter(|name| valid_name(name))
            .collect()
    }

    /// Every template `tenant` can use.
    pub fn list(&self, tenant: &str) -> Vec<TemplateInfo> {
        let mut names: Vec<String> = self
            .dirs
            .iter()
            .flat_map(|d| Templates::names_in(d))
            .collect();
        names.extend(Templates::names_in(&self.tenant_root.join(tenant)));
        names.sort();
        names.dedup();
        names
            .iter()
            .filter_map(|name| self.get(tenant, name).ok())
            .collect()
    }

    /// Template `name` as `tenant` sees it.
    pub fn get(&self, tenant: &str, name: &str) -> Result<TemplateInfo, ControlError> {
        let located = self.locate(tenant, name)?;
        let spec = TemplateSpec::from_file(&located.spec)
            .map_err(|e| ControlError::Internal(format!("template `{name}`: {e}")))?;
        Ok(TemplateInfo {
            name: name.to_owned(),
            description: spec.description,
            vcpus: spec.resources.vcpus,
            memory_mib: spec.resources.memory_mib,
            disk_mib: u64::from(spec.resources.disk_mib),
            ready: self.cell(&located, name).initialized(),
            global: located.tenant.is_none(),
        })
    }

    /// Stores `spec_text` (a TOML template spec) as one of `tenant`'s templates, replacing an
    /// earlier one of the same name, if it asks for no more than the operator's caps and the
    /// tenant has fewer than `max_templates` others. Specs from the API may not reach into
    /// the server's files: no `files` and no `base.image`.
    pub fn save(
        &self,
        tenant: &str,
        spec_text: &str,
        max_templates: Option<usize>,
    ) -> Result<TemplateSpec, ControlError> {
        check_name(tenant)?;
        let spec = TemplateSpec::parse(spec_text, "the request's spec")
            .map_err(|e| ControlError::Invalid(e.to_string()))?;
        check_name(&spec.name)?;
        self.check_caps(&spec)?;
        let _one_at_a_time = self.saving.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(max) = max_templates {
            let others = Templates::names_in(&self.tenant_root.join(tenant))
                .iter()
                .filter(|name| **name != spec.name)
                .count();
            if others >= max {
                return Err(ControlError::QuotaExceeded(format!(
                    "this tenant has {others} templates of at most {max}: delete one first"
                )));
            }
        }
        if !spec.files.is_empty() || spec.base.image.is_some() {
            return Err(ControlError::Invalid(
                "a spec sent through the API cannot copy files from the server (`files`, \
                 `base.image`): install packages instead"
                    .into(),
            ));
        }
        if !spec.run.is_empty() {
            // Build steps run in a chroot on the host as root: only the operator's own specs
            // (in the daemon's template directories) may have them.
            return Err(ControlError::Invalid(
                "a spec sent through the API cannot have `run` steps (they would run on the \
                 host): install packages, and do setup in `start` or in the sandbox"
                    .into(),
            ));
        }
        if self.global(&spec.name).is_some() {
            return Err(ControlError::Conflict(format!(
                "`{}` is a global template; give yours another name",
                spec.name
            )));
        }
        let path = self.own(tenant, &spec.name);
        let dir = path
            .parent()
            .ok_or_else(|| ControlError::Internal("template path without a parent".into()))?;
        std::fs::create_dir_all(dir)
            .and_then(|()| {
                use std::os::unix::fs::PermissionsExt;
                // Tenants' specs (their env, their start commands) are root's alone.
                std::fs::set_permissions(
                    &self.tenant_root,
                    std::fs::Permissions::from_mode(0o700),
                )?;
                let staged = dir.join(".template.toml.new");
                std::fs::write(&staged, spec_text)?;
                std::fs::rename(&staged, &path)
            })
            .map_err(|e| ControlError::Internal(format!("saving the template: {e}")))?;
        // A changed spec is a new template: forget any earlier bake of this name.
        self.baked
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&(Some(tenant.to_owned()), spec.name.clone()));
        Ok(spec)
    }

    /// Refuses a spec that asks for more than the operator's caps on tenants' templates.
    fn check_caps(&self, spec: &TemplateSpec) -> Result<(), ControlError> {
        let (resources, caps) = (&spec.resources, &self.caps);
        for (field, asked, cap) in [
            ("vcpus", resources.vcpus, caps.vcpus),
            ("memory_mib", resources.memory_mib, caps.memory_mib),
            ("disk_mib", resources.disk_mib, caps.disk_mib),
        ] {
            if asked > cap {
                return Err(ControlError::Invalid(format!(
                    "`resources.{field}` is {asked}; this host's templates may ask for at most {cap}"
                )));
            }
        }
        Ok(())
    }

    /// Whether `tenant` sees a template named `name` (its own or a global one).
    pub fn exists(&self, tenant: &str, name: &str) -> bool {
        self.locate(tenant, name).is_ok()
    }

    /// Deletes `tenant`'s template `name` (global templates are read-only).
    pub fn delete(&self, tenant: &str, name: &str) -> Result<(), ControlError> {
        let located = self.locate(tenant, name)?;
        if located.tenant.is_none() {
            return Err(ControlError::Forbidden(format!(
                "`{name}` is a global template: it cannot be deleted through the API"
            )));
        }
        let dir = self.tenant_root.join(tenant).join(name);
        std::fs::remove_dir_all(&dir)
            .map_err(|e| ControlError::Internal(format!("deleting the template: {e}")))?;
        self.baked
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&(Some(tenant.to_owned()), name.to_owned()));
        Ok(())
    }

    /// The baked snapshot of `name` as `tenant` sees it: built and baked on first use
    /// (concurrent callers wait for the same bake; `progress` sees the events of a build this
    /// call runs), then kept; a failed bake is retried by the next call.
    pub async fn baked(
        &self,
        engine: &Engine,
        tenant: &str,
        name: &str,
        progress: Option<Arc<dyn Progress>>,
    ) -> Result<BakedTemplate, ControlError> {
        let located = self.locate(tenant, name)?;
        let cell = self.cell(&located, name);
        let mut made = false;
        let baked = cell
            .get_or_try_init(|| async {
                made = true;
                let prepared = self.prepare(engine, &located, name, progress).await;
                self.prepared[usize::from(prepared.is_err())]
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                prepared
            })
            .await?
            .clone();
        if made {
            // Earlier bakes of this template (before a spec edit, another agent or QEMU) go
            // once nothing uses them.
            self.remove_unused_bakes(
                engine,
                &baked.meta.name,
                located.tenant.as_deref(),
                Some(&baked),
            )
            .await;
        }
        Ok(baked)
    }

    /// Removes the bakes of `owner`'s template `name` other than `keep` that nothing uses
    /// ([`Engine::remove_unused_bakes`]) and, for a tenant's template, the root filesystems
    /// they were made from that no bake left uses. The operator's templates' root filesystems
    /// stay in the cache (where `kiln template build` and the operator's tools find them).
    pub async fn remove_unused_bakes(
        &self,
        engine: &Engine,
        name: &str,
        owner: Option<&str>,
        keep: Option<&BakedTemplate>,
    ) {
        let removed = engine.remove_unused_bakes(name, owner, keep).await;
        if owner.is_none() {
            return;
        }
        let unused: Vec<PathBuf> = removed.into_iter().filter_map(|r| r.rootfs).collect();
        self.collect_rootfs(engine, unused).await;
    }

    /// Removes the root filesystem artefacts `unused` from the cache unless a bake uses one.
    async fn collect_rootfs(&self, engine: &Engine, mut unused: Vec<PathBuf>) {
        unused.sort();
        unused.dedup();
        if unused.is_empty() {
            return;
        }
        let (cache, engine) = (self.cache.clone(), engine.clone());
        // A bake in progress holds its root filesystem (see `prepare`): the check of what
        // uses one is made once no one holds it, and a bake since then counts.
        let collect = move || {
            for rootfs in unused {
                match cache.remove_unless(&rootfs, || engine.bakes_use_rootfs(&rootfs)) {
                    Ok(true) => {
                        tracing::info!(rootfs = %rootfs.display(), "removed a root filesystem nothing uses")
                    }
                    Ok(false) => {}
                    Err(e) => {
                        tracing::warn!(rootfs = %rootfs.display(), error = %e, "removing an unused root filesystem")
                    }
                }
            }
        };
        if let Err(e) = tokio::task::spawn_blocking(collect).await {
            tracing::warn!(error = %e, "collecting unused root filesystems");
        }
    }

    /// How many times a template was made ready, and how many attempts failed.
    pub fn preparations(&self) -> (u64, u64) {
        let [ready, failed] = &self.prepared;
        (
            ready.load(std::sync::atomic::Ordering::Relaxed),
            failed.load(std::sync::atomic::Ordering::Relaxed),
        )
    }

    /// Builds `located`'s images and bakes them (or finds the bake on disk).
    async fn prepare(
        &self,
        engine: &Engine,
        located: &Located,
        name: &str,
        progress: Option<Arc<dyn Progress>>,
    ) -> Result<BakedTemplate, ControlError> {
        tracing::info!(template = name, "building and baking");
        let (cache, agent) = (self.cache.clone(), self.agent.clone());
        let spec = located.spec.clone();
        let forward = Forward(progress);
        // A tenant's build is held to the operator's limits (saved before they changed, or
        // not: checked again); the operator's own are not.
        if located.tenant.is_some() {
            let parsed = TemplateSpec::from_file(&spec)
                .map_err(|e| ControlError::Internal(format!("template `{name}`: {e}")))?;
            self.check_caps(&parsed)?;
        }
        let limit = located.tenant.as_ref().map(|_| self.caps.build_time);
        let (images, rootfs_held) = tokio::task::spawn_blocking(move || {
            // Held until the bake has its own copy: a collection of the cache (another
            // template's delete) cannot take the root filesystem from under it.
            loop {
                let images = kiln_image::template::build_template_until(
                    &spec, &agent, &cache, &forward, limit,
                )?;
                match cache.hold(&images.rootfs.dir) {
                    Ok(Some(held)) => return Ok((images, held)),
                    // Collected between the build and the hold: built again.
                    Ok(None) => continue,
                    Err(e) => {
                        return Err(ImageError::Io {
                            context: format!("holding {}", images.rootfs.dir.display()),
                            source: e,
                        })
                    }
                }
            }
        })
        .await
        .map_err(|e| ControlError::Internal(format!("template build task: {e}")))?
        .map_err(|e| build_error(name, e))?;
        let baked = Templates::bake(engine, &images, located, name).await;
        if baked.is_err() && located.tenant.is_some() {
            // No bake holds this tenant's root filesystem: it would stay in the cache.
            drop(rootfs_held);
            self.collect_rootfs(engine, vec![images.rootfs.dir.clone()])
                .await;
        }
        let baked = baked?;
        // VMMs are kept pre-started for the shared templates only: a tenant's own
        // templates must not hold host resources between creates.
        if located.tenant.is_none() {
            engine.prestart(&baked);
        }
        Ok(baked)
    }

    /// Bakes `images` (owned by `located`'s tenant) and checks the bake, baking again once if
    /// a bake found on disk fails its check.
    async fn bake(
        engine: &Engine,
        images: &kiln_image::template::TemplateImages,
        located: &Located,
        name: &str,
    ) -> Result<BakedTemplate, ControlError> {
        let options = kiln_engine::BakeOptions {
            owner: located.tenant.clone(),
            ..kiln_engine::BakeOptions::default()
        };
        let bake = |options| async {
            let baked = engine.bake_with(images, options).await.map_err(|e| {
                ControlError::Internal(format!("baking template `{name}`: {}", crate::chain(&e)))
            })?;
            let checked = baked.clone();
            let check = tokio::task::spawn_blocking(move || checked.verify())
                .await
                .map_err(|e| ControlError::Internal(format!("template check: {e}")))?;
            Ok::<_, ControlError>((baked, check))
        };
        let (mut baked, mut check) = bake(options.clone()).await?;
        if let Err(e) = &check {
            // A bake is a cache of the template's inputs: one that no longer matches its
            // checksums (damaged on disk, or tampered with) is made again.
            tracing::warn!(template = name, error = %e, "re-baking: the saved bake failed its check");
            engine
                .discard_bake(&baked)
                .map_err(|e| ControlError::Internal(format!("template `{name}`: {e}")))?;
            (baked, check) = bake(options).await?;
        }
        check.map_err(|e| ControlError::Internal(format!("template `{name}`: {e}")))?;
        Ok(baked)
    }
}

/// Maps a failed template build to who can act on it: the spec's author (bad spec, archive or
/// packages), a retry (the package archive changed mid-build), or the operator (tools,
/// kernel, agent, local files).
fn build_error(name: &str, error: ImageError) -> ControlError {
    let message = format!("building template `{name}`: {error}");
    match error {
        ImageError::Spec(_)
        | ImageError::Oci(_)
        | ImageError::MissingFile { .. }
        | ImageError::DiskTooSmall { .. }
        | ImageError::CommandFailed { .. } => ControlError::Invalid(message),
        ImageError::PackagesChanged { .. } => ControlError::Unavailable(message),
        ImageError::TimedOut { .. } => ControlError::QuotaExceeded(format!(
            "{message}: ask for fewer packages, or ask the operator for more build time"
        )),
        ImageError::BuildUser(_)
        | ImageError::MissingTool { .. }
        | ImageError::Io { .. }
        | ImageError::Kernel(_)
        | ImageError::AgentNotStatic { .. } => ControlError::Internal(message),
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

    const TINY: &str = "name = \"tiny\"\ndescription = \"small\"\n[base]\nsuite = \"bookworm\"\n[resources]\nvcpus = 1\nmemory_mib = 128\ndisk_mib = 512\n";

    #[test]
    fn global_and_tenant_templates() {
        let dir = tempfile::tempdir().expect("dir");
        std::fs::create_dir_all(dir.path().join("global/tiny")).expect("mkdir");
        std::fs::write(dir.path().join("global/tiny/template.toml"), TINY).expect("write");
        std::fs::create_dir_all(dir.path().join("global/not-a-template")).expect("mkdir");
        let templates = Templates::new(
            vec![dir.path().join("global")],
            dir.path().join("tenants"),
            Cache::new(dir.path().join("cache")),
            dir.path().join("agent"),
            crate::SpecCaps::default(),
        );
        let listed = templates.list("acme");
        assert_eq!(listed.len(), 1, "{listed:?}");
        assert_eq!(listed[0].name, "tiny");
        assert!(listed[0].global && !listed[0].ready);
        assert!(matches!(
            templates.get("acme", "missing"),
            Err(ControlError::NotFound { .. })
        ));
        assert!(matches!(
            templates.get("acme", "../tiny"),
            Err(ControlError::Invalid(_))
        ));

        // A tenant's own template: seen by that tenant only, deletable by it.
        let own = TINY.replace("\"tiny\"", "\"mine\"");
        templates.save("acme", &own, None).expect("save");
        assert!(templates.get("acme", "mine").is_ok_and(|t| !t.global));
        assert!(matches!(
            templates.get("other", "mine"),
            Err(ControlError::NotFound { .. })
        ));
        assert_eq!(templates.list("acme").len(), 2);
        assert!(matches!(
            templates.save("acme", TINY, None),
            Err(ControlError::Conflict(_))
        ));
        assert!(matches!(
            templates.save("acme", "name = \"x\"", None),
            Err(ControlError::Invalid(_))
        ));
        let with_files = format!("{own}\n[[files]]\nsrc = \"/etc/shadow\"\ndest = \"/x\"\n");
        assert!(matches!(
            templates.save("acme", &with_files, None),
            Err(ControlError::Invalid(_))
        ));
        let with_run = own.replace("[base]", "run = [\"mount /dev/sda1 /mnt\"]\n[base]");
        assert!(matches!(
            templates.save("acme", &with_run, None),
            Err(ControlError::Invalid(_))
        ));
        assert!(matches!(
            templates.delete("acme", "tiny"),
            Err(ControlError::Forbidden(_))
        ));
        templates.delete("acme", "mine").expect("delete");
        assert!(templates.get("acme", "mine").is_err());

        // The operator's caps on what a spec asks for, and on how many a tenant has.
        let small = Templates::new(
            vec![dir.path().join("global")],
            dir.path().join("tenants"),
            Cache::new(dir.path().join("cache")),
            dir.path().join("agent"),
            crate::SpecCaps {
                vcpus: 1,
                memory_mib: 128,
                disk_mib: 512,
                ..crate::SpecCaps::default()
            },
        );
        small.save("acme", &own, Some(1)).expect("at the caps");
        for (from, to) in [
            ("vcpus = 1", "vcpus = 2"),
            ("memory_mib = 128", "memory_mib = 129"),
            ("disk_mib = 512", "disk_mib = 513"),
        ] {
            let refused = small.save("acme", &own.replace(from, to), None);
            let field = from.split(' ').next().unwrap_or_default();
            assert!(
                matches!(&refused, Err(ControlError::Invalid(m)) if m.contains(field)),
                "{refused:?}"
            );
        }
        // Saving one again is not another; a second one is past a quota of one.
        templates.save("acme", &own, Some(1)).expect("replaced");
        let second = own.replace("\"mine\"", "\"second\"");
        assert!(matches!(
            templates.save("acme", &second, Some(1)),
            Err(ControlError::QuotaExceeded(_))
        ));
        templates.save("acme", &second, Some(2)).expect("under two");
    }

    #[test]
    fn build_failures_go_to_who_can_fix_them() {
        let invalid = build_error(
            "t",
            ImageError::DiskTooSmall {
                needed_mib: 300,
                disk_mib: 200,
            },
        );
        assert!(
            matches!(&invalid, ControlError::Invalid(m) if m.contains("`t`") && m.contains("disk_mib")),
            "{invalid:?}"
        );
        assert!(matches!(
            build_error(
                "t",
                ImageError::PackagesChanged {
                    differing: "[]".into()
                }
            ),
            ControlError::Unavailable(_)
        ));
        assert!(matches!(
            build_error(
                "t",
                ImageError::MissingTool {
                    tool: "mmdebstrap".into(),
                    package: "mmdebstrap".into()
                }
            ),
            ControlError::Internal(_)
        ));
    }
}
