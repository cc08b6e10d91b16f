//! Choosing the accelerator: KVM where a standard guest kernel can run, TCG otherwise.

use std::path::Path;

/// How guest code runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    /// Hardware virtualization.
    Kvm,
    /// QEMU's software CPU (slow, but a real, isolated VM).
    Tcg,
}

impl Accel {
    /// QEMU's name for it.
    pub fn qemu_name(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }
}

/// What the user asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AccelChoice {
    /// KVM if a standard guest can run on it, else TCG.
    #[default]
    Auto,
    /// Exactly this one.
    Fixed(Accel),
}

impl std::str::FromStr for AccelChoice {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(AccelChoice::Auto),
            "kvm" => Ok(AccelChoice::Fixed(Accel::Kvm)),
            "tcg" => Ok(AccelChoice::Fixed(Accel::Tcg)),
            other => Err(format!(
                "unknown accelerator `{other}`: use auto, kvm or tcg"
            )),
        }
    }
}

/// The accelerator chosen and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccelDecision {
    /// The choice.
    pub accel: Accel,
    /// Why, for logs and `--help` output.
    pub reason: String,
}

/// Resolves `choice` on this host. Under `auto`, KVM is picked only when `/dev/kvm` opens
/// and the host's KVM is not PVM (`kvm_pvm` runs only PVM-enlightened guest kernels, which
/// kiln's stock Debian kernel is not).
pub fn resolve(choice: AccelChoice) -> AccelDecision {
    resolve_on(
        choice,
        Path::new("/dev/kvm"),
        Path::new("/sys/module/kvm_pvm"),
    )
}

fn resolve_on(choice: AccelChoice, kvm: &Path, pvm_module: &Path) -> AccelDecision {
    match choice {
        AccelChoice::Fixed(accel) => AccelDecision {
            accel,
            reason: "requested".into(),
        },
        AccelChoice::Auto => {
            if pvm_module.exists() {
                return AccelDecision {
                    accel: Accel::Tcg,
                    reason: "KVM here is PVM (kvm_pvm), which cannot run a standard guest kernel"
                        .into(),
                };
            }
            match std::fs::OpenOptions::new().read(true).write(true).open(kvm) {
                Ok(_) => AccelDecision {
                    accel: Accel::Kvm,
                    reason: "/dev/kvm is usable".into(),
                },
                Err(e) => AccelDecision {
                    accel: Accel::Tcg,
                    reason: format!("/dev/kvm unusable: {e}"),
                },
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_avoids_pvm_and_missing_kvm() {
        let dir = tempfile::tempdir().expect("temp dir");
        let kvm = dir.path().join("kvm");
        let pvm = dir.path().join("kvm_pvm");
        assert_eq!(resolve_on(AccelChoice::Auto, &kvm, &pvm).accel, Accel::Tcg);
        std::fs::write(&kvm, b"").expect("fake device");
        assert_eq!(resolve_on(AccelChoice::Auto, &kvm, &pvm).accel, Accel::Kvm);
        std::fs::create_dir(&pvm).expect("fake module");
        let decision = resolve_on(AccelChoice::Auto, &kvm, &pvm);
        assert_eq!(decision.accel, Accel::Tcg);
        assert!(decision.reason.contains("PVM"));
        assert_eq!(
            resolve_on(AccelChoice::Fixed(Accel::Kvm), &kvm, &pvm).accel,
            Accel::Kvm
        );
        assert_eq!("tcg".parse(), Ok(AccelChoice::Fixed(Accel::Tcg)));
        assert!("xen".parse::<AccelChoice>().is_err());
    }
}
