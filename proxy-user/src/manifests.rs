//! Standalone mode's source of desired state: a directory of Kubernetes YAML (Service,
//! EndpointSlice, Pod, Node, Namespace, NetworkPolicy; other kinds are ignored), one or more documents per file.
//! A document that does not parse is reported and skipped; the rest still count.

use std::{
    path::{Path, PathBuf},
    time::SystemTime,
};

use serde::Deserialize;

use crate::model::{Objects, Problem};

#[derive(Deserialize)]
struct TypeMeta {
    kind: Option<String>,
}

/// Splits a YAML stream into its documents at `---` markers (a marker at column 0 always starts
/// a document), so a syntax error in one document cannot affect the others. serde_yaml's own
/// multi-document reader cannot resume after a syntax error.
fn documents(text: &str) -> Vec<&str> {
    let mut docs = Vec::new();
    let mut start = 0;
    let mut offset = 0;
    for line in text.split_inclusive('\n') {
        let l = line.trim_end();
        if l == "---" || l.starts_with("--- ") || l == "..." {
            docs.push(&text[start..offset]);
            start = offset + line.len();
        }
        offset += line.len();
    }
    docs.push(&text[start..]);
    docs
}

/// Parses every document of one YAML text into `objects`; `source` names it in problems.
pub fn parse_into(text: &str, source: &str, objects: &mut Objects, problems: &mut Vec<Problem>) {
    for (i, doc) in documents(text).into_iter().enumerate() {
        let value: serde_yaml::Value = match serde_yaml::from_str(doc) {
            Ok(serde_yaml::Value::Null) => continue,
            Ok(v) => v,
            Err(e) => {
                problems.push(Problem {
                    object: format!("{source} document {}", i + 1),
                    reason: e.to_string(),
                });
                continue;
            }
        };
        let kind = serde_yaml::from_value::<TypeMeta>(value.clone())
            .ok()
            .and_then(|t| t.kind);
        let what = format!(
            "{source} document {} ({})",
            i + 1,
            kind.as_deref().unwrap_or("no kind")
        );
        let res = match kind.as_deref() {
            Some("Service") => serde_yaml::from_value(value).map(|o| objects.services.push(o)),
            Some("EndpointSlice") => serde_yaml::from_value(value).map(|o| objects.slices.push(o)),
            Some("Pod") => serde_yaml::from_value(value).map(|o| objects.pods.push(o)),
            Some("Node") => serde_yaml::from_value(value).map(|o| objects.nodes.push(o)),
            Some("Namespace") => serde_yaml::from_value(value).map(|o| objects.namespaces.push(o)),
            Some("NetworkPolicy") => {
                serde_yaml::from_value(value).map(|o| objects.network_policies.push(o))
            }
            _ => Ok(()),
        };
        if let Err(e) = res {
            problems.push(Problem {
                object: what,
                reason: e.to_string(),
            });
        }
    }
}

/// Parses one YAML text.
pub fn parse_str(text: &str, source: &str) -> (Objects, Vec<Problem>) {
    let mut objects = Objects::default();
    let mut problems = Vec::new();
    parse_into(text, source, &mut objects, &mut problems);
    (objects, problems)
}

fn yaml_files(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            p.extension()
                .is_some_and(|e| e == "yaml" || e == "yml" || e == "json")
        })
        .collect();
    files.sort();
    Ok(files)
}

/// What the directory looks like now (names, sizes, modification times), to notice changes.
pub fn fingerprint(dir: &Path) -> Vec<(PathBuf, u64, Option<SystemTime>)> {
    yaml_files(dir)
        .unwrap_or_default()
        .into_iter()
        .filter_map(|p| {
            let m = std::fs::metadata(&p).ok()?;
            Some((p, m.len(), m.modified().ok()))
        })
        .collect()
}

/// Loads every manifest in `dir`.
pub fn load_dir(dir: &Path) -> std::io::Result<(Objects, Vec<Problem>)> {
    let mut objects = Objects::default();
    let mut problems = Vec::new();
    for file in yaml_files(dir)? {
        match std::fs::read_to_string(&file) {
            Ok(text) => parse_into(
                &text,
                &file.display().to_string(),
                &mut objects,
                &mut problems,
            ),
            Err(e) => problems.push(Problem {
                object: file.display().to_string(),
                reason: e.to_string(),
            }),
        }
    }
    Ok((objects, problems))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn documents_are_sorted_by_kind_and_bad_ones_reported() {
        let yaml = "apiVersion: v1\nkind: Service\nmetadata: {name: a}\nspec: {ports: [{port: 80}]}\n---\n\
                    kind: Pod\nmetadata: {name: p}\n---\nkind: ConfigMap\nmetadata: {name: c}\n---\n\
                    kind: Service\nspec: {ports: \"not a list\"}\n---\n";
        let (o, problems) = parse_str(yaml, "f.yaml");
        assert_eq!((o.services.len(), o.pods.len()), (1, 1));
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(
            problems[0].object.contains("f.yaml document 4 (Service)"),
            "{problems:?}"
        );
    }
}

#[cfg(test)]
mod syntax_error_tests {
    #[test]
    fn a_syntax_error_ends_the_file_without_looping() {
        let yaml = "kind: Pod\nmetadata: {name: p}\n---\n: not yaml [\n---\nkind: Pod\nmetadata: {name: q}\n";
        let (o, problems) = super::parse_str(yaml, "f.yaml");
        assert_eq!(o.pods.len(), 2, "documents after a broken one still count");
        assert_eq!(problems.len(), 1, "{problems:?}");
    }

    #[test]
    fn namespaces_and_network_policies_are_read() {
        let yaml = "kind: Namespace\nmetadata: {name: web, labels: {team: blue}}\n---\n\
                    apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\n\
                    metadata: {name: deny, namespace: web}\nspec: {podSelector: {}}\n---\n\
                    kind: NetworkPolicy\nmetadata: {name: bad}\nspec: {podSelector: 7}\n";
        let (objects, problems) = super::parse_str(yaml, "np.yaml");
        assert_eq!(objects.namespaces.len(), 1);
        assert_eq!(objects.network_policies.len(), 1);
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(problems[0].object.contains("NetworkPolicy"));
    }
}
