//! The curtailment state file: what must survive a restart or a crash (the
//! budget in force with its lease as an absolute time, the protection rules,
//! the last plan). Written atomically on every change (a temporary file in
//! the same directory, fsync, rename, fsync of the directory), read once at
//! start, before any miner is accepted. The file format is in
//! proto/control-v1.md ("State file").

use crate::api::{Amount, BudgetSource, Plan};
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};
use thiserror::Error;

/// The format version this build writes and reads.
pub const VERSION: u32 = 1;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Saved {
    pub version: u32,
    /// When it was written (Unix milliseconds).
    pub saved_at_ms: u64,
    pub budget: Option<SavedBudget>,
    /// `set_protection` rules, oldest first (the last match wins).
    pub protection: Vec<SavedRule>,
    /// The last plan applied by `set_budget`.
    pub last_plan: Option<Plan>,
    /// Power targets sluice set (method = "power-target"): a miner that
    /// comes back after a restart is counted at its own, and restored to
    /// full power when the budget lifts.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub targets: Vec<SavedTarget>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SavedTarget {
    pub address: std::net::IpAddr,
    pub worker: String,
    /// In the firmware's watts.
    pub watts: crate::api::Watts,
    /// The firmware's own target before sluice first changed it, where it
    /// said (what the miner is restored to).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub original_w: Option<crate::api::Watts>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SavedBudget {
    /// Checked as the protocol checks it: a file that holds a budget no
    /// command could set is refused.
    pub amount: Amount,
    /// `site`, `group:NAME` or `workers:PATTERN`.
    pub scope: String,
    pub source: BudgetSource,
    pub reason: String,
    pub set_at_ms: u64,
    /// When the lease runs out (Unix milliseconds); none: until replaced.
    pub lease_until_ms: Option<u64>,
    pub ramp_w_per_s: Option<f64>,
    /// The last plan applied for it: events after a restart name it, and
    /// plan ids go on from it.
    #[serde(default)]
    pub plan_id: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SavedRule {
    pub pattern: String,
    pub protected: bool,
}

#[derive(Debug, Error)]
pub enum StoreError {
    #[error("cannot read the curtailment state file {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("the curtailment state file {path} is not valid: {why}")]
    Invalid { path: String, why: String },
}

/// The state file for a config: `curtail.state_file`, or beside the control
/// socket (`<socket>.state.json`); none when both are unset.
pub fn path_for(state_file: &Path, socket: &Path) -> Option<PathBuf> {
    if !state_file.as_os_str().is_empty() {
        return Some(state_file.to_owned());
    }
    if socket.as_os_str().is_empty() {
        return None;
    }
    let mut p = socket.as_os_str().to_owned();
    p.push(".state.json");
    Some(PathBuf::from(p))
}

/// Read the state file: None when there is none (a first start).
pub fn load(path: &Path) -> Result<Option<Saved>, StoreError> {
    let text = match std::fs::read(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(StoreError::Read { path: path.display().to_string(), source }),
    };
    let invalid = |why: String| StoreError::Invalid { path: path.display().to_string(), why };
    let saved: Saved = serde_json::from_slice(&text).map_err(|e| invalid(e.to_string()))?;
    if saved.version != VERSION {
        return Err(invalid(format!("format version {} (this sluice reads {VERSION})", saved.version)));
    }
    Ok(Some(saved))
}

/// Write the state file atomically: readers (and a restart after a crash at
/// any point) see the old file or the new one, whole.
/// What an instance keeps in its own file: everything; in cluster mode
/// (etcd keeps the budget, the rules and the plan) only its power targets.
pub fn kept_on_disk(mut saved: Saved, clustered: bool) -> Saved {
    if clustered {
        (saved.budget, saved.protection, saved.last_plan) = (None, Vec::new(), None);
    }
    saved
}

pub fn save(path: &Path, saved: &Saved) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_owned(),
        _ => PathBuf::from("."),
    };
    let mut tmp = tempfile::NamedTempFile::new_in(&dir)?;
    serde_json::to_writer_pretty(&mut tmp, saved)?;
    tmp.write_all(b"\n")?;
    tmp.as_file().sync_all()?;
    tmp.persist(path).map_err(|e| e.error)?;
    std::fs::File::open(&dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Saved {
        Saved {
            version: VERSION,
            saved_at_ms: 1_795_000_000_000,
            budget: Some(SavedBudget {
                amount: Amount::Fraction(0.6),
                scope: "group:hall-a".into(),
                source: BudgetSource::Command,
                reason: "dr-event-42".into(),
                set_at_ms: 1_794_999_990_000,
                lease_until_ms: Some(1_795_001_800_000),
                ramp_w_per_s: None,
                plan_id: 3,
            }),
            protection: vec![SavedRule { pattern: "gpu-adjacent.*".into(), protected: true }],
            last_plan: None,
            targets: vec![SavedTarget {
                address: "192.0.2.11".parse().unwrap(),
                worker: "hallb.r1.m01".into(),
                watts: crate::api::Watts(1656.0),
                original_w: Some(crate::api::Watts(3000.0)),
            }],
        }
    }

    /// In cluster mode the file keeps this instance's power targets and
    /// nothing etcd keeps; a file from before `original_w` still loads.
    #[test]
    fn cluster_mode_keeps_only_the_power_targets() {
        let all = sample();
        assert_eq!(kept_on_disk(all.clone(), false), all);
        let own = kept_on_disk(all.clone(), true);
        assert_eq!((own.budget, own.protection.len(), own.last_plan), (None, 0, None));
        assert_eq!(own.targets, all.targets);
        let old = r#"{"version":1,"saved_at_ms":1,"budget":null,"protection":[],"last_plan":null,
            "targets":[{"address":"192.0.2.11","worker":"w","watts":1656.0}]}"#;
        let old: Saved = serde_json::from_str(old).unwrap();
        assert_eq!(old.targets[0].original_w, None);
    }

    #[test]
    fn saved_state_reads_back_whole_and_a_missing_file_is_a_first_start() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s.json");
        assert!(load(&p).unwrap().is_none());
        save(&p, &sample()).unwrap();
        assert_eq!(load(&p).unwrap(), Some(sample()));
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&p).unwrap().permissions().mode() & 0o777, 0o600, "owner only");
        // Overwritten in place, no temporary file left behind.
        let mut two = sample();
        two.budget = None;
        save(&p, &two).unwrap();
        assert_eq!(load(&p).unwrap(), Some(two));
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    /// A damaged file is an error that names the file and what is wrong.
    #[test]
    fn a_damaged_file_says_where_and_what() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s.json");
        let mut newer = serde_json::to_value(sample()).unwrap();
        newer["version"] = 9.into();
        let mut negative = serde_json::to_value(sample()).unwrap();
        negative["budget"]["amount"] = serde_json::json!({"watts": -5.0});
        let table: Vec<(Vec<u8>, &str)> = vec![
            (b"{\"version\": 1, \"budget\": {".to_vec(), "EOF"),
            (b"\xff\xfe".to_vec(), "expected value"),
            (b"{}".to_vec(), "missing field"),
            (newer.to_string().into_bytes(), "format version 9"),
            (negative.to_string().into_bytes(), "watts must be a finite number >= 0"),
        ];
        for (bytes, why) in table {
            std::fs::write(&p, &bytes).unwrap();
            let e = load(&p).unwrap_err().to_string();
            assert!(e.contains(&p.display().to_string()) && e.contains(why), "{e}");
        }
    }

    #[test]
    fn the_default_path_sits_beside_the_socket() {
        assert_eq!(path_for(Path::new(""), Path::new("/run/sluice.sock")), Some("/run/sluice.sock.state.json".into()));
        assert_eq!(path_for(Path::new("/var/lib/s.json"), Path::new("")), Some("/var/lib/s.json".into()));
        assert_eq!(path_for(Path::new(""), Path::new("")), None);
    }
}
