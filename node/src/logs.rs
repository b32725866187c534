//! Container logs as the node serves them (kubelet's `/containerLogs/{ns}/{pod}/{container}`,
//! which the API server's `pods/log` proxies to): the CRI log files the runtime writes under
//! `<log dir>/<ns>_<pod>_<uid>/<container>/<attempt>.log` (lines of `time stream tag text`),
//! with kubectl's `tailLines`, `sinceSeconds`, `timestamps`, `previous` and `follow`.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use k8s_openapi::jiff::Timestamp;

/// How logs are asked for (the query of `pods/log`).
#[derive(Clone, Debug, Default)]
pub struct Query {
    /// Only the last N lines.
    pub tail_lines: Option<usize>,
    /// Only lines younger than this.
    pub since_seconds: Option<i64>,
    /// Prefix each line with its RFC 3339 time.
    pub timestamps: bool,
    /// The previous (terminated) instance of the container.
    pub previous: bool,
    /// Keep streaming new lines.
    pub follow: bool,
}

/// The log file of `container` of the pod `ns/pod` (the newest attempt, or the one before
/// with `previous`), if there is one.
pub fn file(
    log_dir: &Path,
    ns: &str,
    pod: &str,
    container: &str,
    previous: bool,
) -> Option<PathBuf> {
    let prefix = format!("{ns}_{pod}_");
    let pod_dir = std::fs::read_dir(log_dir)
        .ok()?
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
        .max_by_key(|e| e.metadata().and_then(|m| m.modified()).ok())?
        .path();
    let mut attempts: Vec<(u32, PathBuf)> = std::fs::read_dir(pod_dir.join(container))
        .ok()?
        .flatten()
        .filter_map(|e| {
            let n = e
                .file_name()
                .to_string_lossy()
                .strip_suffix(".log")?
                .parse()
                .ok()?;
            Some((n, e.path()))
        })
        .collect();
    attempts.sort();
    let index = attempts.len().checked_sub(if previous { 2 } else { 1 })?;
    attempts.into_iter().nth(index).map(|(_, p)| p)
}

/// One CRI log line as kubectl shows it (partial lines joined by the caller's stream).
fn render(line: &str, q: &Query, cutoff: Option<Timestamp>) -> Option<String> {
    let mut parts = line.splitn(4, ' ');
    let time = parts.next()?;
    let _stream = parts.next()?;
    let tag = parts.next()?;
    let text = parts.next().unwrap_or("");
    if let Some(c) = cutoff
        && time.parse::<Timestamp>().is_ok_and(|t| t < c)
    {
        return None;
    }
    let end = if tag.starts_with('P') { "" } else { "\n" };
    Some(if q.timestamps {
        format!("{time} {text}{end}")
    } else {
        format!("{text}{end}")
    })
}

/// The lines `q` asks for from `path` now, and how far the file was read.
pub fn read(path: &Path, q: &Query) -> std::io::Result<(String, u64)> {
    let bytes = std::fs::read(path)?;
    let text = String::from_utf8_lossy(&bytes);
    let cutoff = q.since_seconds.map(|s| {
        Timestamp::from_second(Timestamp::now().as_second() - s).unwrap_or(Timestamp::UNIX_EPOCH)
    });
    let lines: Vec<String> = text.lines().filter_map(|l| render(l, q, cutoff)).collect();
    let skip = q.tail_lines.map_or(0, |n| lines.len().saturating_sub(n));
    Ok((lines[skip..].concat(), bytes.len() as u64))
}

/// Lines appended to `path` after `offset`, waiting up to `wait` for some.
pub async fn more(
    path: &Path,
    offset: u64,
    q: &Query,
    wait: Duration,
) -> std::io::Result<(String, u64)> {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let len = tokio::fs::metadata(path).await?.len();
        // Rotated (a new, shorter file under the same name): follow it from its start.
        let offset = if len < offset { 0 } else { offset };
        if len > offset {
            let bytes = tokio::fs::read(path).await?;
            let start = usize::try_from(offset).unwrap_or(0).min(bytes.len());
            // Only whole lines; a line still being written waits for the next round.
            let end = bytes[start..]
                .iter()
                .rposition(|b| *b == b'\n')
                .map_or(start, |i| start + i + 1);
            let text = String::from_utf8_lossy(&bytes[start..end]);
            let out: String = text.lines().filter_map(|l| render(l, q, None)).collect();
            return Ok((out, end as u64));
        }
        if tokio::time::Instant::now() >= deadline {
            return Ok((String::new(), offset));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// kubelet's log rotation, the file half: when the container log at `path` has grown past
/// `max_bytes`, it is renamed `<path>.<UTC time>` (the runtime is then told to reopen `path`,
/// ReopenContainerLog) and the oldest rotated files beyond `max_files - 1` are removed, so at
/// most `max_files` files of the container are kept. Says whether it rotated.
pub fn rotate(path: &Path, max_bytes: u64, max_files: usize) -> std::io::Result<bool> {
    let len = match std::fs::metadata(path) {
        Ok(m) => m.len(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e),
    };
    if len <= max_bytes {
        return Ok(false);
    }
    let stamp = Timestamp::now().strftime("%Y%m%d-%H%M%S%.f").to_string();
    let mut rotated = path.as_os_str().to_owned();
    rotated.push(format!(".{stamp}"));
    std::fs::rename(path, &rotated)?;
    prune(path, max_files.saturating_sub(1))?;
    Ok(true)
}

/// Removes the oldest rotated files of the log at `path` beyond `keep`.
fn prune(path: &Path, keep: usize) -> std::io::Result<()> {
    let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
        return Ok(());
    };
    let prefix = format!("{}.", name.to_string_lossy());
    let mut old: Vec<PathBuf> = std::fs::read_dir(dir)?
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
        .map(|e| e.path())
        .collect();
    // The names end in the rotation time, so they sort oldest first.
    old.sort();
    let excess = old.len().saturating_sub(keep);
    for p in &old[..excess] {
        std::fs::remove_file(p)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_log_past_its_size_is_rotated_and_old_rotations_pruned() {
        let dir = std::env::temp_dir().join(format!("weft-rotate-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let log = dir.join("0.log");
        std::fs::write(&log, "short\n").unwrap();
        assert!(!rotate(&log, 100, 3).unwrap(), "small enough");
        for round in 0..5 {
            std::fs::write(&log, "x".repeat(200)).unwrap();
            assert!(rotate(&log, 100, 3).unwrap(), "round {round}");
            assert!(!log.exists());
            std::thread::sleep(Duration::from_millis(2));
        }
        let names: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        // Two rotated files and (once the runtime reopens it) the current one: three in all.
        assert_eq!(names.len(), 2, "{names:?}");
        assert!(names.iter().all(|n| n.starts_with("0.log.")));
        assert!(rotate(&dir.join("missing.log"), 1, 3).is_ok_and(|r| !r));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn cri_log_lines_are_rendered_like_kubelet() {
        let dir = std::env::temp_dir().join(format!("weft-logs-{}", std::process::id()));
        let c = dir.join("demo_web-1_uid1/echo");
        std::fs::create_dir_all(&c).unwrap();
        std::fs::write(
            c.join("0.log"),
            "2026-01-01T00:00:00.000000001Z stdout F first run\n",
        )
        .unwrap();
        std::fs::write(
            c.join("1.log"),
            "2026-01-01T00:00:01.5Z stdout F one\n2026-01-01T00:00:02Z stderr P tw\n2026-01-01T00:00:02Z stderr F o\n2026-01-01T00:00:03Z stdout F three\n",
        )
        .unwrap();
        let now = file(&dir, "demo", "web-1", "echo", false).unwrap();
        assert!(now.ends_with("1.log"));
        let (all, _) = read(&now, &Query::default()).unwrap();
        assert_eq!(all, "one\ntwo\nthree\n");
        let (tail, _) = read(
            &now,
            &Query {
                tail_lines: Some(1),
                timestamps: true,
                ..Query::default()
            },
        )
        .unwrap();
        assert_eq!(tail, "2026-01-01T00:00:03Z three\n");
        let prev = file(&dir, "demo", "web-1", "echo", true).unwrap();
        assert_eq!(read(&prev, &Query::default()).unwrap().0, "first run\n");
        assert!(file(&dir, "demo", "web-2", "echo", false).is_none());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
