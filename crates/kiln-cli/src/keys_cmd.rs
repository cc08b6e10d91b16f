//! `kiln keys`: API keys, managed in the daemon's database on this host (root only; this is
//! how the first key is made). Admin keys can also make keys through the API.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

/// Where the daemon keeps its database.
#[derive(Debug, Clone, clap::Args)]
pub struct StoreArgs {
    /// The daemon's data directory.
    #[arg(long, env = "KILN_DATA_DIR", default_value = "/var/lib/kiln")]
    pub data_dir: PathBuf,
}

fn store(args: &StoreArgs) -> Result<kiln_control::store::Store> {
    kiln_control::open_store(&args.data_dir)
        .with_context(|| format!("opening the database in {}", args.data_dir.display()))
}

/// Makes a key and prints its secret (once).
pub fn create(
    args: &StoreArgs,
    tenant: &str,
    name: &str,
    admin: bool,
    save: Option<&str>,
    json: bool,
) -> Result<()> {
    let (record, secret) = kiln_control::mint_key(&store(args)?, tenant, name, admin)?;
    if let Some(url) = save {
        let path = crate::client_cmd::cli_config_path()
            .context("no home directory to save the CLI config in")?;
        save_cli_config(&path, url, &secret)?;
        eprintln!("saved to {} (the CLI uses it from now on)", path.display());
    }
    if json {
        let mut body = kiln_api::types::KeyBody::from(record);
        body.secret = Some(secret);
        println!("{}", serde_json::to_string_pretty(&body)?);
    } else {
        eprintln!(
            "key {} for tenant `{}`{}; its secret{}:",
            record.id,
            record.tenant,
            if record.admin { " (admin)" } else { "" },
            if save.is_some() {
                ""
            } else {
                " (shown only now)"
            }
        );
        println!("{secret}");
    }
    Ok(())
}

fn save_cli_config(path: &Path, url: &str, secret: &str) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let config = crate::client_cmd::CliConfig {
        url: Some(url.to_owned()),
        api_key: Some(secret.to_owned()),
    };
    let text = toml::to_string(&config)?;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    std::io::Write::write_all(&mut file, text.as_bytes())?;
    Ok(())
}

/// Lists keys (never their secrets).
pub fn list(args: &StoreArgs, json: bool) -> Result<()> {
    let keys = store(args)?.list_keys(None)?;
    if json {
        let keys: Vec<kiln_api::types::KeyBody> = keys.into_iter().map(Into::into).collect();
        println!("{}", serde_json::to_string_pretty(&keys)?);
        return Ok(());
    }
    println!(
        "{:<18} {:<14} {:<6} {:<8} NAME",
        "ID", "TENANT", "ADMIN", "STATE"
    );
    for key in keys {
        println!(
            "{:<18} {:<14} {:<6} {:<8} {}",
            key.id,
            key.tenant,
            if key.admin { "yes" } else { "no" },
            if key.revoked_at_ms.is_some() {
                "revoked"
            } else {
                "active"
            },
            key.name
        );
    }
    Ok(())
}

/// Revokes a key.
pub fn revoke(args: &StoreArgs, id: &str) -> Result<()> {
    if !store(args)?.revoke_key(id, None)? {
        bail!("no active key `{id}` (`kiln keys ls` lists them)");
    }
    println!("{id}");
    Ok(())
}
