//! `wasmq plugin new`: a plugin crate that builds on its own.
//!
//! The crate is complete from the first minute: a working stub of the
//! chosen role with its doc, a native unit test, a self-test vector the
//! broker checks when it loads the build, a README with the whole loop,
//! and its own `[workspace]` and release profile, so it builds in any
//! folder, inside another workspace or not. The templates are compiled
//! into the binary, so the scaffold matches the broker that made it.

use std::path::{Path, PathBuf};

/// The role a new plugin plays.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Role {
    /// An exchange type: picks the bindings each message goes to.
    Router,
    /// Guards one binding: passes or drops each message.
    Filter,
    /// Keeps, rewrites, drops or dead-letters each message before routing.
    Transform,
}

impl Role {
    fn as_str(self) -> &'static str {
        match self {
            Role::Router => "router",
            Role::Filter => "filter",
            Role::Transform => "transform",
        }
    }

    fn template(self) -> &'static str {
        match self {
            Role::Router => include_str!("templates/router.rs.tmpl"),
            Role::Filter => include_str!("templates/filter.rs.tmpl"),
            Role::Transform => include_str!("templates/transform.rs.tmpl"),
        }
    }
}

mod embedded {
    include!(concat!(env!("OUT_DIR"), "/guest_sdk.rs"));
}

/// Where the new crate gets the guest SDK from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Sdk {
    /// The SDK this binary was built with, written into the new crate
    /// (`vendor/wasmq-sdk`): the crate builds wherever it is copied, with
    /// no wasmq checkout and no registry.
    Embedded,
    /// A local `guest-sdk` folder (a wasmq checkout), for SDK development.
    Path(PathBuf),
    /// A version from the crate registry.
    Version(String),
}

/// Where [`Sdk::Embedded`] writes the SDK, inside the new crate.
pub const VENDORED_SDK: &str = "vendor/wasmq-sdk";

/// The edition the SDK is written in (the workspace's; a unit test holds
/// them together).
const SDK_EDITION: &str = "2024";

/// The vendored SDK's manifest: the workspace's inherited fields written
/// out, so that it builds outside the workspace.
fn sdk_manifest() -> String {
    format!(
        "# The wasmq guest SDK {version}, written by `wasmq plugin new` of wasmq {version}.\n\
         # A newer wasmq writes a newer one: `wasmq plugin new` into a scratch folder\n\
         # and copy its {VENDORED_SDK} over this one.\n\
         [package]\n\
         name = \"wasmq-sdk\"\n\
         description = \"Write wasmq exchange-type, filter and transform plugins in plain Rust\"\n\
         version = \"{version}\"\n\
         edition = \"{SDK_EDITION}\"\n\
         rust-version = \"{rust}\"\n\
         license = \"{license}\"\n\
         readme = \"README.md\"\n\
         publish = false\n\n\
         [dependencies]\n",
        version = env!("CARGO_PKG_VERSION"),
        rust = env!("CARGO_PKG_RUST_VERSION"),
        license = env!("CARGO_PKG_LICENSE"),
    )
}

impl Sdk {
    fn dependency(&self) -> Result<String, ScaffoldError> {
        Ok(match self {
            Sdk::Embedded => format!("wasmq-sdk = {{ path = \"{VENDORED_SDK}\" }}"),
            Sdk::Path(p) => {
                let p = p.canonicalize().map_err(|e| ScaffoldError::Sdk {
                    path: p.clone(),
                    reason: e.to_string(),
                })?;
                if !p.join("Cargo.toml").is_file() {
                    return Err(ScaffoldError::Sdk {
                        path: p,
                        reason: "no Cargo.toml in it".into(),
                    });
                }
                let Some(text) = p.to_str() else {
                    return Err(ScaffoldError::Sdk {
                        path: p,
                        reason: "the path is not UTF-8, which Cargo.toml cannot name".into(),
                    });
                };
                // A TOML string, escaped by the TOML writer: a quote or a
                // newline in the path stays inside it.
                let quoted = toml::Value::String(text.to_owned()).to_string();
                format!("wasmq-sdk = {{ path = {quoted} }}")
            }
            Sdk::Version(v) => {
                // Only a version requirement: anything else would be
                // pasted into the manifest as TOML.
                let req = semver::VersionReq::parse(v.trim())
                    .map_err(|e| ScaffoldError::SdkVersion(v.clone(), e.to_string()))?;
                format!("wasmq-sdk = \"{req}\"")
            }
        })
    }
}

/// Why a crate could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ScaffoldError {
    /// The name cannot be a plugin (file) name and a crate name.
    #[error(
        "plugin name '{0}': use lowercase letters, digits and '-' (starting with a letter), at most 64"
    )]
    Name(String),
    /// A name Rust or Cargo keeps for itself.
    #[error("plugin name '{0}' is reserved: {1}")]
    Reserved(String, &'static str),
    /// `--sdk-version` is not a version requirement.
    #[error("--sdk-version '{0}' is not a version requirement (e.g. 0.1 or ^0.1.2): {1}")]
    SdkVersion(String, String),
    /// The folder exists and is not empty.
    #[error("{0} exists and is not empty; choose another name or folder")]
    Exists(PathBuf),
    /// The SDK folder is not usable.
    #[error("guest SDK at {path}: {reason}")]
    Sdk {
        /// The folder given.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// Writing failed.
    #[error("writing {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
}

/// Whether `name` works as a plugin name, a file name and a crate name.
pub fn valid_name(name: &str) -> bool {
    name.len() <= 64
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !name.ends_with('-')
}

/// Words Rust keeps (strict and reserved, every edition): a crate or a
/// type named after one does not compile.
const KEYWORDS: &[&str] = &[
    "abstract", "as", "async", "await", "become", "box", "break", "const", "continue", "crate",
    "do", "dyn", "else", "enum", "extern", "false", "final", "fn", "for", "gen", "if", "impl",
    "in", "let", "loop", "macro", "match", "mod", "move", "mut", "override", "priv", "pub", "ref",
    "return", "self", "static", "struct", "super", "trait", "true", "try", "type", "typeof",
    "unsafe", "unsized", "use", "virtual", "where", "while", "yield",
];

/// Crate names Rust, Cargo and the new crate itself keep.
const RESERVED: &[&str] = &[
    "std",
    "core",
    "alloc",
    "proc-macro",
    "test",
    "build",
    "deps",
    "examples",
    "incremental",
    "wasmq-sdk",
];

/// Why `name` (already a [`valid_name`]) cannot be a plugin crate, if it
/// cannot.
pub fn reserved(name: &str) -> Option<&'static str> {
    let windows = |n: &str| {
        matches!(n, "con" | "prn" | "aux" | "nul")
            || ((n.starts_with("com") || n.starts_with("lpt"))
                && n.len() == 4
                && n.as_bytes()[3].is_ascii_digit())
    };
    if KEYWORDS.contains(&name) {
        Some("a Rust keyword")
    } else if RESERVED.contains(&name) {
        Some("a crate name Rust or Cargo keeps (or the SDK's own)")
    } else if windows(name) {
        Some("a device name on Windows")
    } else {
        None
    }
}

/// `my-router` → `MyRouter`.
fn type_name(name: &str) -> String {
    name.split('-')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let mut c = p.chars();
            c.next()
                .map(|f| f.to_ascii_uppercase().to_string() + c.as_str())
                .unwrap_or_default()
        })
        .collect()
}

fn fill(template: &str, name: &str, role: Role, sdk: &str) -> String {
    template
        .replace("{{name}}", name)
        .replace("{{crate}}", name)
        .replace("{{type}}", &type_name(name))
        .replace("{{role}}", role.as_str())
        .replace("{{sdk}}", sdk)
}

/// Write a new plugin crate `name` of `role` into `dir`; returns the files
/// written.
pub fn create(
    dir: &Path,
    name: &str,
    role: Role,
    sdk: &Sdk,
) -> Result<Vec<PathBuf>, ScaffoldError> {
    if !valid_name(name) {
        return Err(ScaffoldError::Name(name.to_owned()));
    }
    if let Some(why) = reserved(name) {
        return Err(ScaffoldError::Reserved(name.to_owned(), why));
    }
    if dir.exists()
        && std::fs::read_dir(dir)
            .map(|mut d| d.next().is_some())
            .unwrap_or(true)
    {
        return Err(ScaffoldError::Exists(dir.to_owned()));
    }
    let sdk_choice = sdk;
    let sdk = sdk.dependency()?;
    let files = [
        ("Cargo.toml", include_str!("templates/Cargo.toml.tmpl")),
        (".gitignore", include_str!("templates/gitignore.tmpl")),
        ("src/lib.rs", role.template()),
        ("README.md", include_str!("templates/README.md.tmpl")),
    ];
    let mut written = Vec::new();
    for (file, template) in files {
        let path = dir.join(file);
        let io = |source| ScaffoldError::Io {
            path: path.clone(),
            source,
        };
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(io)?;
        }
        std::fs::write(&path, fill(template, name, role, &sdk)).map_err(io)?;
        written.push(path);
    }
    if *sdk_choice == Sdk::Embedded {
        let vendored = dir.join(VENDORED_SDK);
        let manifest = sdk_manifest();
        let sdk_files = std::iter::once(("Cargo.toml", manifest.as_str()))
            .chain(embedded::GUEST_SDK.iter().copied());
        for (file, text) in sdk_files {
            let path = vendored.join(file);
            let io = |source| ScaffoldError::Io {
                path: path.clone(),
                source,
            };
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent).map_err(io)?;
            }
            std::fs::write(&path, text).map_err(io)?;
        }
        written.push(vendored);
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked_and_become_type_names() {
        assert!(valid_name("geo-router2"));
        for bad in [
            "",
            "Geo",
            "2geo",
            "geo_router",
            "geo-",
            "a b",
            &"a".repeat(65),
        ] {
            assert!(!valid_name(bad), "{bad}");
        }
        assert_eq!(type_name("geo-router2"), "GeoRouter2");
        for kept in ["self", "fn", "std", "wasmq-sdk", "test", "con", "com1"] {
            assert!(reserved(kept).is_some(), "{kept}");
        }
        assert!(reserved("selfie").is_none());
    }

    #[test]
    fn a_hostile_sdk_version_or_path_stays_a_toml_string() {
        let dir = tempfile::tempdir().unwrap();
        let injected = "1\"\n[build-dependencies]\nevil = \"1";
        assert!(matches!(
            create(
                &dir.path().join("a"),
                "p",
                Role::Router,
                &Sdk::Version(injected.into())
            ),
            Err(ScaffoldError::SdkVersion(..))
        ));
        let files = create(
            &dir.path().join("b"),
            "p",
            Role::Router,
            &Sdk::Version("^0.1".into()),
        )
        .unwrap();
        let manifest: toml::Table = std::fs::read_to_string(&files[0]).unwrap().parse().unwrap();
        assert_eq!(manifest["dependencies"]["wasmq-sdk"].as_str(), Some("^0.1"));
        // A folder whose name has a quote and a newline.
        let odd = dir.path().join("sdk \"x\"\n[y]");
        std::fs::create_dir_all(&odd).unwrap();
        std::fs::write(odd.join("Cargo.toml"), "").unwrap();
        let files = create(
            &dir.path().join("c"),
            "p",
            Role::Router,
            &Sdk::Path(odd.clone()),
        )
        .unwrap();
        let manifest: toml::Table = std::fs::read_to_string(&files[0]).unwrap().parse().unwrap();
        let path = manifest["dependencies"]["wasmq-sdk"]["path"]
            .as_str()
            .unwrap();
        assert_eq!(std::path::Path::new(path), odd.canonicalize().unwrap());
        assert!(manifest.get("y").is_none(), "nothing injected");
        assert!(matches!(
            create(
                &dir.path().join("d"),
                "self",
                Role::Router,
                &Sdk::Version("0.1".into())
            ),
            Err(ScaffoldError::Reserved(..))
        ));
    }

    #[test]
    fn the_embedded_sdk_is_written_into_the_crate_whole() {
        let dir = tempfile::tempdir().unwrap();
        let at = dir.path().join("p");
        let files = create(&at, "p", Role::Filter, &Sdk::Embedded).unwrap();
        let manifest: toml::Table = std::fs::read_to_string(&files[0]).unwrap().parse().unwrap();
        assert_eq!(
            manifest["dependencies"]["wasmq-sdk"]["path"].as_str(),
            Some(VENDORED_SDK)
        );
        let sdk = at.join(VENDORED_SDK);
        let checkout = Path::new(env!("CARGO_MANIFEST_DIR")).join("../guest-sdk");
        for entry in std::fs::read_dir(checkout.join("src")).unwrap() {
            let f = entry.unwrap().path();
            let name = f.file_name().unwrap();
            assert_eq!(
                std::fs::read_to_string(sdk.join("src").join(name)).unwrap(),
                std::fs::read_to_string(&f).unwrap(),
                "{name:?}"
            );
        }
        let vendored: toml::Table = std::fs::read_to_string(sdk.join("Cargo.toml"))
            .unwrap()
            .parse()
            .unwrap();
        let workspace: toml::Table = std::fs::read_to_string(checkout.join("../Cargo.toml"))
            .unwrap()
            .parse()
            .unwrap();
        let inherited = &workspace["workspace"]["package"];
        for field in ["version", "edition", "rust-version", "license"] {
            assert_eq!(vendored["package"][field], inherited[field], "{field}");
        }
    }

    #[test]
    fn every_placeholder_is_filled() {
        let dir = tempfile::tempdir().unwrap();
        for role in [Role::Router, Role::Filter, Role::Transform] {
            let at = dir.path().join(role.as_str());
            let sdk = Sdk::Path(Path::new(env!("CARGO_MANIFEST_DIR")).join("../guest-sdk"));
            let files = create(&at, "my-plugin", role, &sdk).unwrap();
            for f in files {
                let text = std::fs::read_to_string(&f).unwrap();
                assert!(!text.contains("{{"), "{} keeps a placeholder", f.display());
            }
            let lib = std::fs::read_to_string(at.join("src/lib.rs")).unwrap();
            assert!(lib.contains(&format!("plugin!({} = MyPlugin)", role.as_str())));
            assert!(matches!(
                create(&at, "my-plugin", role, &sdk),
                Err(ScaffoldError::Exists(_))
            ));
        }
    }
}
