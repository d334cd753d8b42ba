//! Taking over from an agent of another ABI version (a rolling update or a rollback).
//!
//! Its maps are pinned under `<bpffs dir>/v<its ABI>`, ours under `v<ABI_VERSION>`, and its
//! programs stay on the pod interfaces, enforcing with its maps, until ours replace them
//! (by name, atomically). So the run loop fills our maps first, then replaces the programs,
//! and only then removes the previous pins ([`remove_pin_dir`]); tracked flows are carried
//! over from its conntrack maps when their layout is ours ([`Datapath::carry_conntrack`],
//! `npm_common::CONNTRACK_COMPATIBLE_SINCE`), so established connections of isolated pods
//! keep passing across the switch.
use std::fs;
use std::path::{Path, PathBuf};

use aya::maps::{HashMap, Map, MapData};
use npm_common::maps::{
    Addr16, CtKey, CtKey4, CtValue, MAP_CONNTRACK, MAP_CONNTRACK4, addr_from_v4,
};
use npm_common::{ABI_VERSION, CONNTRACK_COMPATIBLE_SINCE};

use super::loader::{Datapath, DatapathError, map_error, map_missing};

/// `bpf_map_update_elem`'s flag: insert only if the key is absent.
const BPF_NOEXIST: u64 = 1;

/// The pin directories of other ABI versions under `bpffs_dir` (`v<N>`, N ≠ ours), by version.
/// A missing `bpffs_dir` has none.
pub fn previous_pin_dirs(bpffs_dir: &Path) -> Vec<(u32, PathBuf)> {
    let Ok(entries) = fs::read_dir(bpffs_dir) else {
        return Vec::new();
    };
    let mut out: Vec<(u32, PathBuf)> = entries
        .filter_map(Result::ok)
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let v: u32 = name.strip_prefix('v')?.parse().ok()?;
            (v != ABI_VERSION).then(|| (v, e.path()))
        })
        .collect();
    out.sort();
    out
}

/// Every ABI version's pin directory under `bpffs_dir` (`v<N>`, ours included), by version.
/// A missing `bpffs_dir` has none.
pub fn pin_dirs(bpffs_dir: &Path) -> Vec<(u32, PathBuf)> {
    let mut out = previous_pin_dirs(bpffs_dir);
    let ours = bpffs_dir.join(format!("v{ABI_VERSION}"));
    if ours.is_dir() {
        out.push((ABI_VERSION, ours));
        out.sort();
    }
    out
}

/// Whether `path` (which must exist) is on a bpffs: `uninstall` removes pins only there, so a
/// mistyped `--bpffs-dir` never deletes ordinary files.
pub fn on_bpffs(path: &Path) -> Result<bool, DatapathError> {
    super::sys::fs_type(path)
        .map(|t| t == super::sys::BPF_FS_MAGIC)
        .map_err(|source| DatapathError::PinDir {
            path: path.to_owned(),
            source,
        })
}

/// Removes a previous ABI's pin directory: its pinned maps (they are freed once no program
/// uses them either) and the directory itself.
pub fn remove_pin_dir(dir: &Path) -> Result<(), DatapathError> {
    let err = |source| DatapathError::RemovePins {
        path: dir.to_owned(),
        source,
    };
    for entry in fs::read_dir(dir).map_err(err)? {
        let entry = entry.map_err(err)?;
        // Pins are files on bpffs; `remove_file` unpins.
        fs::remove_file(entry.path()).map_err(err)?;
    }
    fs::remove_dir(dir).map_err(err)
}

impl Datapath {
    /// Copies the live flows of the conntrack maps pinned in `from` (an agent of ABI
    /// `version`) into ours, without replacing a flow ours already track, each counted under
    /// the counter slot `slot_of(its ifindex)` gives (our endpoints' slots; 0, the unmanaged
    /// slot, for an interface we do not manage).
    ///
    /// Only flows that our datapath could have created are copied: one of the two addresses
    /// of an entry at interface I must be one `owner_of` (our IDENTITIES: address → local
    /// ifindex) gives to I. Entries of a datapath without the source-address check (before
    /// ABI 5), made by a pod that sent from an address not its own, stay behind. Nothing is copied from a version whose
    /// conntrack layout differs from ours (before `CONNTRACK_COMPATIBLE_SINCE`), nor from a
    /// newer one (a rollback: its layout is unknown to this build): their flows are judged as
    /// new after the switch. Returns how many flows were copied.
    pub fn carry_conntrack(
        &mut self,
        from: &Path,
        version: u32,
        slot_of: impl Fn(u32) -> Option<u16>,
        owner_of: impl Fn(&Addr16) -> Option<u32>,
    ) -> Result<usize, DatapathError> {
        if !(CONNTRACK_COMPATIBLE_SINCE..ABI_VERSION).contains(&version) {
            return Ok(0);
        }
        let mut copied = 0;
        let owned4 = |k: &CtKey4| {
            [k.addr_lo, k.addr_hi]
                .iter()
                .any(|a| owner_of(&addr_from_v4(*a)) == Some(k.ifindex))
        };
        let owned6 = |k: &CtKey| {
            [k.addr_lo, k.addr_hi]
                .iter()
                .any(|a| owner_of(a) == Some(k.ifindex))
        };
        copied += self.carry::<CtKey4>(from, MAP_CONNTRACK4, |k| k.ifindex, &owned4, &slot_of)?;
        copied += self.carry::<CtKey>(from, MAP_CONNTRACK, |k| k.ifindex, &owned6, &slot_of)?;
        Ok(copied)
    }

    fn carry<K: aya::Pod>(
        &mut self,
        from: &Path,
        name: &str,
        ifindex_of: fn(&K) -> u32,
        owned: &impl Fn(&K) -> bool,
        slot_of: &impl Fn(u32) -> Option<u16>,
    ) -> Result<usize, DatapathError> {
        let path = from.join(name);
        if !path.exists() {
            return Ok(0);
        }
        let shown = path.display().to_string();
        let old = MapData::from_pin(&path).map_err(map_error(&shown))?;
        let old = Map::from_map_data(old).map_err(map_error(&shown))?;
        // Checks the key and value sizes: a map of another layout is refused here.
        let old: HashMap<MapData, K, CtValue> =
            HashMap::try_from(old).map_err(map_error(&shown))?;
        let entries: Vec<(K, CtValue)> = old.iter().filter_map(Result::ok).collect();
        let ours = self.ebpf.map_mut(name).ok_or_else(|| map_missing(name))?;
        let mut ours: HashMap<&mut MapData, K, CtValue> =
            HashMap::try_from(ours).map_err(map_error(name))?;
        let mut copied = 0;
        for (k, mut v) in entries {
            if !owned(&k) {
                continue;
            }
            v.slot = slot_of(ifindex_of(&k)).unwrap_or(0);
            // BPF_NOEXIST: a flow our programs track already keeps its own entry.
            if ours.insert(k, v, BPF_NOEXIST).is_ok() {
                copied += 1;
            }
        }
        Ok(copied)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn previous_pin_dirs_are_the_other_versions_and_go_whole() {
        let root = std::env::temp_dir().join(format!("npm-upgrade-unit-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        assert!(
            previous_pin_dirs(&root).is_empty(),
            "a missing directory has none"
        );
        for d in [
            format!("v{ABI_VERSION}"),
            "v1".into(),
            format!("v{}", ABI_VERSION + 1),
            "vx".into(),
            "other".into(),
        ] {
            fs::create_dir_all(root.join(&d)).expect("mkdir");
        }
        fs::write(root.join("v1").join("NPM_CT"), b"pin").expect("file");
        fs::write(root.join("v9"), b"a file, not a pin directory").expect("file");
        let found = previous_pin_dirs(&root);
        assert_eq!(
            found,
            vec![
                (1, root.join("v1")),
                (ABI_VERSION + 1, root.join(format!("v{}", ABI_VERSION + 1)))
            ]
        );
        remove_pin_dir(&root.join("v1")).expect("remove");
        assert!(!root.join("v1").exists());
        assert!(root.join(format!("v{ABI_VERSION}")).exists(), "ours stay");
        let _ = fs::remove_dir_all(&root);
    }
}
