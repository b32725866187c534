//! Images for a registry-less machine: [`build`] packs a binary (and the shared libraries it
//! loads, found with `ldd`) into a single-layer OCI image archive, as `kind load` users do
//! with `docker save`; [`load`] imports such an archive (or a docker-archive tarball) into a
//! node's containerd under the `k8s.io` namespace, where its CRI plugin finds it.

use std::{
    io::Write as _,
    path::{Path, PathBuf},
    process::Command,
};

use serde_json::json;
use sha2::{Digest, Sha256};

/// Building or loading an image failed.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A helper (`ldd`, `ctr`) failed.
    #[error("{0}")]
    Tool(String),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ImageError + '_ {
    move |source| ImageError::Io {
        path: path.to_owned(),
        source,
    }
}

/// The fully qualified name containerd stores `tag` under (`weft/echo:dev` is
/// `docker.io/weft/echo:dev`, as the CRI plugin normalises image references).
pub fn normalize(tag: &str) -> String {
    let tagged = if tag
        .rsplit('/')
        .next()
        .is_some_and(|last| last.contains(':') || last.contains('@'))
    {
        tag.to_owned()
    } else {
        format!("{tag}:latest")
    };
    let first = tagged.split('/').next().unwrap_or("");
    let has_registry = tagged.contains('/')
        && (first.contains('.') || first.contains(':') || first == "localhost");
    match (has_registry, tagged.contains('/')) {
        (true, _) => tagged,
        (false, true) => format!("docker.io/{tagged}"),
        (false, false) => format!("docker.io/library/{tagged}"),
    }
}

/// The shared libraries `binary` loads (its ELF interpreter included), by absolute path.
fn libraries(binary: &Path) -> Result<Vec<PathBuf>, ImageError> {
    let out = Command::new("ldd")
        .arg(binary)
        .output()
        .map_err(|e| ImageError::Tool(format!("running ldd: {e}")))?;
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(text
        .lines()
        .filter_map(|l| {
            let l = l.trim();
            let path = match l.split_once("=>") {
                Some((_, right)) => right.split_whitespace().next()?,
                None => l.split_whitespace().next()?,
            };
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect())
}

fn blob(out: &mut tar::Builder<std::fs::File>, bytes: &[u8]) -> Result<String, ImageError> {
    let digest: String = Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let mut header = tar::Header::new_gnu();
    header.set_size(bytes.len() as u64);
    header.set_mode(0o644);
    header.set_cksum();
    out.append_data(&mut header, format!("blobs/sha256/{digest}"), bytes)
        .map_err(|e| ImageError::Tool(format!("writing the archive: {e}")))?;
    Ok(format!("sha256:{digest}"))
}

fn file_name(binary: &Path) -> Result<String, ImageError> {
    binary
        .file_name()
        .and_then(|n| n.to_str())
        .map(str::to_owned)
        .ok_or_else(|| ImageError::Tool(format!("{} has no file name", binary.display())))
}

/// Writes an OCI image archive to `out` whose one layer holds `binary` at `/<name>` (and its
/// libraries at their paths), run as the entrypoint with `args`; each of `tools` (a shell,
/// `tar` for `kubectl cp`, ...) is added at `/bin/<name>` with its libraries.
pub fn build(
    binary: &Path,
    tools: &[PathBuf],
    tag: &str,
    args: &[String],
    out: &Path,
) -> Result<(), ImageError> {
    let name = file_name(binary)?;
    let mut layer = tar::Builder::new(Vec::new());
    let mut placed = std::collections::BTreeMap::new();
    placed.insert(PathBuf::from(&name), binary.to_owned());
    for tool in tools {
        placed.insert(Path::new("bin").join(file_name(tool)?), tool.clone());
    }
    for from in [binary]
        .into_iter()
        .chain(tools.iter().map(PathBuf::as_path))
    {
        for lib in libraries(from)? {
            let inside = lib.strip_prefix("/").unwrap_or(&lib).to_owned();
            placed.entry(inside).or_insert(lib);
        }
    }
    let files: Vec<(PathBuf, PathBuf, u32)> = placed
        .into_iter()
        .map(|(inside, from)| (from, inside, 0o755))
        .collect();
    let mut dirs = std::collections::BTreeSet::new();
    for (_, inside, _) in &files {
        for a in inside.ancestors().skip(1) {
            if !a.as_os_str().is_empty() {
                dirs.insert(a.to_owned());
            }
        }
    }
    for d in dirs.iter().chain([PathBuf::from("tmp")].iter()) {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Directory);
        h.set_mode(if d == Path::new("tmp") { 0o1777 } else { 0o755 });
        h.set_size(0);
        h.set_cksum();
        layer
            .append_data(&mut h, d, std::io::empty())
            .map_err(|e| ImageError::Tool(format!("building the layer: {e}")))?;
    }
    for (from, inside, mode) in &files {
        // Follow symlinks: the layer holds the library itself under the name it is loaded by.
        let bytes = std::fs::read(from).map_err(io(from))?;
        let mut h = tar::Header::new_gnu();
        h.set_size(bytes.len() as u64);
        h.set_mode(*mode);
        h.set_cksum();
        layer
            .append_data(&mut h, inside, bytes.as_slice())
            .map_err(|e| ImageError::Tool(format!("building the layer: {e}")))?;
    }
    let layer = layer
        .into_inner()
        .map_err(|e| ImageError::Tool(format!("building the layer: {e}")))?;
    let file = std::fs::File::create(out).map_err(io(out))?;
    let mut archive = tar::Builder::new(file);
    let layer_digest = blob(&mut archive, &layer)?;
    let mut entrypoint = vec![format!("/{name}")];
    entrypoint.extend(args.iter().cloned());
    let config = serde_json::to_vec(&json!({
        "architecture": "amd64", "os": "linux",
        "config": {"Entrypoint": entrypoint, "Env": ["PATH=/:/bin"], "WorkingDir": "/"},
        "rootfs": {"type": "layers", "diff_ids": [layer_digest]},
        "history": [{"created_by": format!("weft image build --from {}", binary.display())}],
    }))
    .unwrap_or_default();
    let config_digest = blob(&mut archive, &config)?;
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": config.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": layer_digest, "size": layer.len()}],
    }))
    .unwrap_or_default();
    let manifest_digest = blob(&mut archive, &manifest)?;
    let full = normalize(tag);
    let index = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": manifest_digest,
                       "size": manifest.len(),
                       "annotations": {"io.containerd.image.name": full,
                                       "org.opencontainers.image.ref.name": full.rsplit(':').next().unwrap_or("latest")}}],
    }))
    .unwrap_or_default();
    for (name, bytes) in [
        ("oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#.to_vec()),
        ("index.json", index),
    ] {
        let mut h = tar::Header::new_gnu();
        h.set_size(bytes.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        archive
            .append_data(&mut h, name, bytes.as_slice())
            .map_err(|e| ImageError::Tool(format!("writing the archive: {e}")))?;
    }
    let mut file = archive
        .into_inner()
        .map_err(|e| ImageError::Tool(format!("writing the archive: {e}")))?;
    file.flush().map_err(io(out))?;
    Ok(())
}

/// Imports an OCI or docker-archive tarball into the containerd at `address` (namespace
/// `k8s.io`), with `ctr` (containerd's own client, shipped with it).
pub fn load(archive: &Path, address: &Path) -> Result<(), ImageError> {
    let out = Command::new("ctr")
        .arg("--address")
        .arg(address)
        .args([
            "--namespace",
            "k8s.io",
            "images",
            "import",
            "--all-platforms",
        ])
        .arg(archive)
        .output()
        .map_err(|e| ImageError::Tool(format!("running ctr: {e}")))?;
    if !out.status.success() {
        return Err(ImageError::Tool(format!(
            "importing {}: {}",
            archive.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_are_normalised_like_the_cri_plugin() {
        assert_eq!(normalize("weft/echo:dev"), "docker.io/weft/echo:dev");
        assert_eq!(normalize("pause"), "docker.io/library/pause:latest");
        assert_eq!(normalize("localhost:5000/x"), "localhost:5000/x:latest");
        assert_eq!(
            normalize("registry.k8s.io/pause:3.9"),
            "registry.k8s.io/pause:3.9"
        );
    }
}
