//! Loading, pinning, attaching and test-running the embedded eBPF object.

use std::{
    fs, io,
    os::fd::AsFd as _,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    programs::{
        ProgramError, SchedClassifier, TcAttachType,
        tc::{self, NlOptions, SchedClassifierLink, TcAttachOptions, TcError, TcHandle},
    },
};
use npm_common::maps::{
    CLOCK_NS_PER_JIFFY, CtKey, CtKey4, CtValue, FLOWS_GEN_ACTIVE, FLOWS_GEN_LAST, MAP_CIDRS,
    MAP_CLOCK, MAP_CONNTRACK, MAP_CONNTRACK4, MAP_DEFERRED, MAP_ENDPOINTS, MAP_EVENT_STATS,
    MAP_EVENTS, MAP_FLOWS, MAP_FRAGS, MAP_IDENTITIES, MAP_METRICS, MAP_PAIRS, MAP_POLICY,
    MAP_SERVICES, PROG_CLOCK, PROG_FROM_POD, PROG_HOST_EGRESS, PROG_PASS, PROG_TO_POD,
};
use npm_common::maps::{PROG_BENCH_BUMP, PROG_BENCH_NEW};

use super::sys;

/// The BPF object built by `build.rs` (npm-ebpf, bpfel-unknown-none).
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/npm"));

/// Every map of the object; all are pinned by name when a pin directory is given.
pub(super) const MAPS: [&str; 15] = [
    MAP_ENDPOINTS,
    MAP_IDENTITIES,
    MAP_CIDRS,
    MAP_POLICY,
    MAP_PAIRS,
    MAP_CONNTRACK,
    MAP_CONNTRACK4,
    MAP_METRICS,
    MAP_CLOCK,
    MAP_FLOWS,
    MAP_SERVICES,
    MAP_DEFERRED,
    MAP_FRAGS,
    MAP_EVENTS,
    MAP_EVENT_STATS,
];

/// How the programs are attached to the TC hooks of an interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TcMode {
    /// tcx (Linux 6.6+), the default where the kernel has it: each program is attached with
    /// `BPF_PROG_ATTACH` (no qdisc, no link, so it stays when the agent exits) and runs
    /// straight from the hook, without the qdisc and filter-chain walk of cls_bpf (about 1.5 %
    /// of the connection rate of the traffic benchmark, BENCHMARKS.md). A new agent finds the
    /// programs of a previous one by name and replaces them atomically.
    Tcx,
    /// Netlink cls_bpf filters (direct action) on a clsact qdisc at [`TC_PRIORITY`] /
    /// [`TC_HANDLE`]: for kernels without tcx.
    Netlink,
}

/// Every program the attach functions put on a TC hook. On one hook, any of them is ours to
/// replace (as a cls_bpf filter at our priority and handle would be): the baseline gives way
/// to the classifier and back, and a copy left by a previous agent is replaced, not stacked.
pub(super) const OUR_PROGS: [&str; 4] = [PROG_FROM_POD, PROG_TO_POD, PROG_HOST_EGRESS, PROG_PASS];

/// Priority of our TC filters (lower runs first). Fixed, together with [`TC_HANDLE`], so a
/// new agent finds and replaces the filters of a previous one instead of adding a copy.
pub const TC_PRIORITY: u16 = 10;
/// Handle of our TC filters within [`TC_PRIORITY`] (0x4e50, "NP").
pub const TC_HANDLE: u32 = 0x4e50;

/// Which program runs on which TC hook of the pod's host-side interface.
const HOOKS: [(&str, TcAttachType); 2] = [
    (PROG_FROM_POD, TcAttachType::Ingress),
    (PROG_TO_POD, TcAttachType::Egress),
];

/// [`Datapath::attach_baseline`]: the pass-only program on both hooks of a pod interface.
const BASELINE_HOOKS: [(&str, TcAttachType); 2] = [
    (PROG_PASS, TcAttachType::Ingress),
    (PROG_PASS, TcAttachType::Egress),
];

/// Which program runs on the node's other links (not loopback, not a pod interface) when
/// Service ranges are configured: the post-DNAT check of deferred egress.
const HOST_HOOKS: [(&str, TcAttachType); 1] = [(PROG_HOST_EGRESS, TcAttachType::Egress)];

/// Errors of the datapath; each names the interface, program or map involved.
#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error("the embedded eBPF object is empty (was the agent built with AYA_BUILD_SKIP=1?)")]
    EmptyObject,
    #[error(
        "{path} is not on a bpffs, so pins would not outlive the agent: mount one on the node \
         (`mount -t bpf bpf /sys/fs/bpf`; systemd does it at boot)"
    )]
    NotBpffs { path: PathBuf },
    #[error("creating the pin directory {path}")]
    PinDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("loading the eBPF object (pin directory: {pin_dir:?})")]
    Load {
        pin_dir: Option<PathBuf>,
        #[source]
        source: Box<aya::EbpfError>,
    },
    #[error("program {prog} is missing from the eBPF object")]
    ProgramMissing { prog: String },
    #[error("program {prog}")]
    Program {
        prog: String,
        #[source]
        source: Box<ProgramError>,
    },
    #[error("adding the clsact qdisc to {iface}")]
    Qdisc {
        iface: String,
        #[source]
        source: Box<TcError>,
    },
    #[error("interface {iface}")]
    Interface {
        iface: String,
        #[source]
        source: io::Error,
    },
    #[error("attaching {prog} to {iface}")]
    Attach {
        iface: String,
        prog: String,
        #[source]
        source: Box<ProgramError>,
    },
    #[error("detaching {prog} from {iface}")]
    Detach {
        iface: String,
        prog: String,
        #[source]
        source: Box<TcError>,
    },
    #[error("detaching {prog} from the tcx hook of {iface}")]
    DetachTcx {
        iface: String,
        prog: String,
        #[source]
        source: io::Error,
    },
    #[error("listing the tcx programs of {iface}")]
    Query {
        iface: String,
        #[source]
        source: Box<ProgramError>,
    },
    #[error("interface {iface} is now #{now}, not #{ifindex} (renamed while attaching)")]
    Renamed {
        iface: String,
        ifindex: u32,
        now: u32,
    },
    #[error("map {map} is missing from the eBPF object or was already taken")]
    MapMissing { map: String },
    #[error("BPF_PROG_TEST_RUN of {prog}")]
    TestRun {
        prog: String,
        #[source]
        source: io::Error,
    },
    #[error("map {map}")]
    Map {
        map: String,
        #[source]
        source: Box<aya::maps::MapError>,
    },
    #[error("removing the pins of a previous ABI in {path}")]
    RemovePins {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

impl DatapathError {
    /// A short, stable label for metrics (`npm_datapath_errors_total{kind=...}`).
    pub fn metric_label(&self) -> &'static str {
        match self {
            Self::EmptyObject => "empty_object",
            Self::PinDir { .. } | Self::NotBpffs { .. } | Self::RemovePins { .. } => "pin_dir",
            Self::Load { .. } => "load",
            Self::ProgramMissing { .. } | Self::Program { .. } => "program",
            Self::Qdisc { .. } => "qdisc",
            Self::Interface { .. } | Self::Renamed { .. } => "interface",
            Self::Attach { .. } => "attach",
            Self::Detach { .. } | Self::DetachTcx { .. } => "detach",
            Self::Query { .. } => "interface",
            Self::MapMissing { .. } => "map",
            Self::TestRun { .. } => "test_run",
            Self::Map { .. } => "map_io",
        }
    }
}

/// Fails unless the nearest existing ancestor of `dir` (itself included) is on a bpffs: pins
/// elsewhere fail, and a directory on the host's sysfs (where the DaemonSet's hostPath lands
/// when the node has no bpffs mounted) cannot even be created.
fn check_bpffs(dir: &Path) -> Result<(), DatapathError> {
    let existing = dir
        .ancestors()
        .find(|p| p.exists())
        .unwrap_or(Path::new("/"));
    match sys::fs_type(existing) {
        Ok(sys::BPF_FS_MAGIC) => Ok(()),
        Ok(_) => Err(DatapathError::NotBpffs {
            path: existing.to_owned(),
        }),
        Err(source) => Err(DatapathError::PinDir {
            path: existing.to_owned(),
            source,
        }),
    }
}

/// What one `BPF_PROG_TEST_RUN` returned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TestRunResult {
    /// The program's return value of the last run (`TC_ACT_*`).
    pub retval: u32,
    /// Average run time in nanoseconds, as measured by the kernel.
    pub duration_ns: u32,
    /// The packet after the last run.
    pub data_out: Vec<u8>,
    /// `skb->mark` after the last run.
    pub mark_out: u32,
}

/// What [`Datapath::load_with`] sizes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoadOptions {
    /// `max_entries` of each conntrack map (`NPM_CT4`, `NPM_CT`); the config's
    /// MaxConntrackEntries. Default [`npm_common::maps::CONNTRACK_MAX`].
    pub conntrack_entries: u32,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            conntrack_entries: npm_common::maps::CONNTRACK_MAX,
        }
    }
}

/// The loaded datapath: the eBPF object with both classifiers loaded (verified).
///
/// Attachments are *not* tied to this value: TC filters stay on their interfaces after it is
/// dropped or the process exits, and keep enforcing with the pinned maps until a new agent
/// replaces them ([`Datapath::attach`]) or removes them ([`Datapath::detach`]). The programs
/// stay loaded as long as a filter references them.
pub struct Datapath {
    pub(super) ebpf: Ebpf,
    tc_mode: TcMode,
}

impl std::fmt::Debug for Datapath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Datapath").finish_non_exhaustive()
    }
}

impl Datapath {
    /// Loads the embedded object and verifies both programs, with the default
    /// [`LoadOptions`].
    ///
    /// With `Some(dir)`, `dir` is created and every map is pinned as `dir/<MAP_NAME>`; maps
    /// already pinned there (by a previous agent) are adopted with their contents. The
    /// caller puts the ABI version in `dir` (e.g. `/sys/fs/bpf/npm/v1`) so maps of another
    /// layout are never adopted. With `None`, nothing is pinned: the maps live as long as
    /// this value and any attached program.
    pub fn load(pin_dir: Option<&Path>) -> Result<Self, DatapathError> {
        Self::load_with(pin_dir, LoadOptions::default())
    }

    /// [`Datapath::load`] with `options`. Sizes apply to maps created here; a map adopted
    /// from a pin keeps the size it was created with (the kernel cannot resize a map, and
    /// replacing it would drop every tracked flow), and a differing size is logged as a
    /// warning: the new size takes effect after a restart with fresh pins.
    pub fn load_with(pin_dir: Option<&Path>, options: LoadOptions) -> Result<Self, DatapathError> {
        if let Some(dir) = pin_dir {
            check_bpffs(dir)?;
        }
        if OBJECT.is_empty() {
            return Err(DatapathError::EmptyObject);
        }
        if let Err(error) = sys::raise_memlock() {
            tracing::debug!(%error, "could not raise RLIMIT_MEMLOCK (not needed on kernels >= 5.11)");
        }
        let mut loader = EbpfLoader::new();
        for map in [MAP_CONNTRACK4, MAP_CONNTRACK] {
            loader.map_max_entries(map, options.conntrack_entries);
        }
        if let Some(dir) = pin_dir {
            fs::create_dir_all(dir).map_err(|source| DatapathError::PinDir {
                path: dir.to_owned(),
                source,
            })?;
            for map in MAPS {
                loader.map_pin_path(map, dir.join(map));
            }
        }
        let mut ebpf = loader.load(OBJECT).map_err(|source| DatapathError::Load {
            pin_dir: pin_dir.map(Path::to_owned),
            source: Box::new(source),
        })?;
        for map in [MAP_CONNTRACK4, MAP_CONNTRACK] {
            let size = ebpf.map(map).map(|m| match m {
                aya::maps::Map::LruHashMap(d) => d.info().map(|i| i.max_entries()),
                _ => Ok(0),
            });
            match size {
                Some(Ok(n)) if n != options.conntrack_entries => tracing::warn!(
                    map,
                    pinned = n,
                    configured = options.conntrack_entries,
                    "conntrack map adopted from its pin keeps its size; MaxConntrackEntries \
                     takes effect after a restart with fresh pins (remove the pin directory; \
                     tracked flows are then re-evaluated)"
                ),
                Some(Err(error)) => tracing::warn!(map, %error, "reading the conntrack map's size"),
                _ => {}
            }
        }
        // The pass-only baseline and the HZ probe are loaded too (they are tiny) so `test_run`
        // can run them; they are never attached.
        for prog in
            HOOKS
                .map(|(p, _)| p)
                .into_iter()
                .chain([PROG_HOST_EGRESS, PROG_PASS, PROG_CLOCK])
        {
            classifier(&mut ebpf, prog)?
                .load()
                .map_err(program_error(prog))?;
        }
        // tcx where the kernel has it: querying a hook of `lo` fails (EINVAL) on kernels
        // before 6.6.
        let tc_mode = match SchedClassifier::query_tcx("lo", TcAttachType::Ingress) {
            Ok(_) => TcMode::Tcx,
            Err(error) => {
                tracing::info!(%error, "the kernel has no tcx; attaching cls_bpf filters instead");
                TcMode::Netlink
            }
        };
        let mut dp = Self { ebpf, tc_mode };
        dp.set_clock()?;
        // A fresh generation: entries of a previous agent (adopted pins) are not trusted.
        dp.set_flow_cache(true)?;
        Ok(dp)
    }

    /// Writes the datapath's clock factor (nanoseconds per jiffy) into `NPM_CLOCK`, from the
    /// kernel's HZ as [`Datapath::measure_hz`] finds it (once per process). A factor already
    /// there (pins adopted from a previous agent: bpffs does not outlive a boot, and HZ does
    /// not change within one) is kept, so a restart does not spend the 100 ms measurement.
    fn set_clock(&mut self) -> Result<(), DatapathError> {
        if self.clock_get(CLOCK_NS_PER_JIFFY)? != 0 {
            return Ok(());
        }
        static HZ: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
        let hz = match HZ.get() {
            Some(&hz) => hz,
            None => {
                let hz = self.measure_hz()?;
                *HZ.get_or_init(|| hz)
            }
        };
        self.clock_set(CLOCK_NS_PER_JIFFY, 1_000_000_000 / hz)
    }

    /// `NPM_CLOCK[index]`.
    fn clock_get(&self, index: u32) -> Result<u64, DatapathError> {
        let map = self
            .ebpf
            .map(MAP_CLOCK)
            .ok_or_else(|| map_missing(MAP_CLOCK))?;
        let clock: aya::maps::Array<&aya::maps::MapData, u64> =
            aya::maps::Array::try_from(map).map_err(map_error(MAP_CLOCK))?;
        clock.get(&index, 0).map_err(map_error(MAP_CLOCK))
    }

    /// Sets `NPM_CLOCK[index]` to `value`.
    fn clock_set(&mut self, index: u32, value: u64) -> Result<(), DatapathError> {
        let map = self
            .ebpf
            .map_mut(MAP_CLOCK)
            .ok_or_else(|| map_missing(MAP_CLOCK))?;
        let mut clock: aya::maps::Array<&mut aya::maps::MapData, u64> =
            aya::maps::Array::try_from(map).map_err(map_error(MAP_CLOCK))?;
        clock.set(index, value, 0).map_err(map_error(MAP_CLOCK))
    }

    /// The datapath clock's nanoseconds per jiffy (`NPM_CLOCK`), as [`Datapath::load`] set it.
    pub fn clock_ns_per_jiffy(&self) -> Result<u64, DatapathError> {
        self.clock_get(CLOCK_NS_PER_JIFFY)
    }

    /// Turns the flow cache (`NPM_FLOWS`, `npm_common::maps` "FLOWS") on with a fresh
    /// generation (`NPM_CLOCK[FLOWS_GEN_ACTIVE]`), so no entry written before can hit, or off
    /// (every cacheable packet takes the conntrack path). [`Datapath::load`] turns it on.
    pub fn set_flow_cache(&mut self, on: bool) -> Result<(), DatapathError> {
        if !on {
            return self.clock_set(FLOWS_GEN_ACTIVE, 0);
        }
        // The active generation is 0 or the last one handed out.
        let last = self.clock_get(FLOWS_GEN_LAST)?;
        // 0 means off, and the datapath compares 32 bits: after u32::MAX generations, wrap to
        // 1. Safe: an entry is a hit for at most 1 s after it was written.
        let next = if last >= u64::from(u32::MAX) {
            1
        } else {
            last + 1
        };
        self.clock_set(FLOWS_GEN_LAST, next)?;
        self.clock_set(FLOWS_GEN_ACTIVE, next)
    }

    /// The flow cache's active generation (0: off).
    pub fn flow_cache_generation(&self) -> Result<u32, DatapathError> {
        let generation = self.clock_get(FLOWS_GEN_ACTIVE)?;
        // Below 2³² by construction (`set_flow_cache`).
        Ok(u32::try_from(generation).unwrap_or(u32::MAX))
    }

    /// Makes every flow-cache entry a miss, if the cache is on. Whoever removes or rewrites
    /// conntrack entries from userspace calls it afterwards, so no cached answer outlives
    /// the entry it copied.
    pub fn invalidate_flow_cache(&mut self) -> Result<(), DatapathError> {
        if self.flow_cache_generation()? != 0 {
            self.set_flow_cache(true)?;
        }
        Ok(())
    }

    /// The kernel's HZ: `jiffies` read twice by `npm_clock`, 100 ms apart by
    /// `CLOCK_MONOTONIC`, rounded to the nearest of the values Linux offers (100, 250, 300,
    /// 1000) when within 10 % of it, else the measured rate.
    fn measure_hz(&self) -> Result<u64, DatapathError> {
        // Any Ethernet-sized frame: the probe does not look at it.
        let frame = [0u8; 14];
        let read = || -> Result<(u32, std::time::Instant), DatapathError> {
            let r = self.test_run(PROG_CLOCK, &frame, 1, 1)?;
            Ok((r.retval, std::time::Instant::now()))
        };
        let (j0, t0) = read()?;
        std::thread::sleep(std::time::Duration::from_millis(100));
        let (j1, t1) = read()?;
        let ticks = f64::from(j1.wrapping_sub(j0) & 0x7fff_ffff);
        let rate = ticks / (t1 - t0).as_secs_f64();
        let hz = hz_of_rate(rate);
        tracing::debug!(rate, hz, "kernel HZ measured (datapath clock)");
        Ok(hz)
    }

    /// How [`Datapath::attach`] and the other attach functions attach (chosen at load).
    pub fn tc_mode(&self) -> TcMode {
        self.tc_mode
    }

    /// Attaches by `mode` from now on (e.g. [`TcMode::Netlink`] on a kernel with tcx, to test
    /// the fallback or an upgrade from it).
    pub fn set_tc_mode(&mut self, mode: TcMode) {
        self.tc_mode = mode;
    }

    /// Attaches `npm_from_pod` (TC ingress) and `npm_to_pod` (TC egress) to `ifname`, in the
    /// calling thread's network namespace, by [`Datapath::tc_mode`]:
    /// - tcx: appended after the hook's other programs. Where one of ours is already there
    ///   (e.g. left by a previous agent), it is replaced atomically, and further copies are
    ///   removed. Then our cls_bpf filters (an agent from before tcx) are removed.
    /// - netlink: adds the clsact qdisc if absent and attaches cls_bpf filters (direct
    ///   action) at [`TC_PRIORITY`]/[`TC_HANDLE`]; a filter already there is replaced
    ///   atomically.
    ///
    /// Idempotent: never stacks a second copy. Returns the interface index.
    pub fn attach(&mut self, ifname: &str) -> Result<u32, DatapathError> {
        self.attach_hooks(ifname, &HOOKS)
    }

    /// Attaches the pass-only `npm_pass` where [`Datapath::attach`] puts the classifiers (both
    /// hooks, same priority and handle, replacing them): for benchmarks, so traffic through
    /// a filter that does nothing shows what the TC hook itself costs. Returns the interface
    /// index. [`Datapath::attach`] replaces it; [`Datapath::detach_baseline`] removes it.
    pub fn attach_baseline(&mut self, ifname: &str) -> Result<u32, DatapathError> {
        self.attach_hooks(ifname, &BASELINE_HOOKS)
    }

    /// Removes what [`Datapath::attach_baseline`] attached (absent is not an error).
    pub fn detach_baseline(&mut self, ifname: &str) -> Result<(), DatapathError> {
        detach_hooks(ifname, &BASELINE_HOOKS)
    }

    /// Attaches `npm_host_egress` (TC egress) to a node link that is neither loopback nor a
    /// pod interface, like [`Datapath::attach`] (same priority and handle, replaced in place,
    /// idempotent). Returns the interface index.
    pub fn attach_host(&mut self, ifname: &str) -> Result<u32, DatapathError> {
        self.attach_hooks(ifname, &HOST_HOOKS)
    }

    /// Removes `npm_host_egress` from `ifname` (absent is not an error).
    pub fn detach_host(&mut self, ifname: &str) -> Result<(), DatapathError> {
        detach_hooks(ifname, &HOST_HOOKS)
    }

    fn attach_hooks(
        &mut self,
        ifname: &str,
        hooks: &[(&str, TcAttachType)],
    ) -> Result<u32, DatapathError> {
        self.attach_hooks_by(ifname, hooks, self.tc_mode)
    }

    fn attach_hooks_by(
        &mut self,
        ifname: &str,
        hooks: &[(&str, TcAttachType)],
        mode: TcMode,
    ) -> Result<u32, DatapathError> {
        let ifindex = ifindex(ifname)?;
        if mode == TcMode::Tcx {
            for &(prog, hook) in hooks {
                self.attach_tcx(ifname, ifindex, prog, hook)?;
            }
            // After the tcx programs are in place, so the interface is never unenforced:
            // remove a cls_bpf filter of ours (any program at our priority and handle).
            for &(prog, hook) in hooks {
                remove_our_filter(ifname, prog, hook)?;
            }
            return Ok(ifindex);
        }
        match tc::qdisc_add_clsact(ifname) {
            Ok(()) => {}
            Err(TcError::NetlinkError(e)) if e.raw_os_error() == Some(libc::EEXIST) => {}
            Err(source) => {
                return Err(DatapathError::Qdisc {
                    iface: ifname.to_owned(),
                    source: Box::new(source),
                });
            }
        }
        for &(prog, hook) in hooks {
            let attach_err = |source: ProgramError| DatapathError::Attach {
                iface: ifname.to_owned(),
                prog: prog.to_owned(),
                source: Box::new(source),
            };
            let classifier = classifier(&mut self.ebpf, prog)?;
            let handle = TcHandle::from(TC_HANDLE);
            // Replace first: succeeds only if a filter exists at our priority and handle.
            let replaced = SchedClassifierLink::attached(ifname, hook, TC_PRIORITY, handle, None)
                .map_err(|source| DatapathError::Interface {
                    iface: ifname.to_owned(),
                    source,
                })
                .map(|link| classifier.attach_to_link(link));
            let link_id = match replaced {
                Ok(Ok(id)) => id,
                // None there yet (ENOENT): create it (NLM_F_EXCL).
                Ok(Err(_)) => classifier
                    .attach_with_options(
                        ifname,
                        hook,
                        TcAttachOptions::Netlink(NlOptions {
                            priority: TC_PRIORITY,
                            handle,
                            classid: None,
                        }),
                    )
                    .map_err(attach_err)?,
                Err(e) => return Err(e),
            };
            // Detach the link from the program's bookkeeping so dropping the `Ebpf` leaves the
            // filter in place. A netlink link holds no fd, so forgetting it leaks nothing.
            let link = classifier.take_link(link_id).map_err(attach_err)?;
            std::mem::forget(link);
        }
        Ok(ifindex)
    }

    /// Puts `prog` on tcx `hook` of `ifname`: in place of the first of ours there (unless it
    /// is this very program), appended if none; further copies of ours are detached.
    fn attach_tcx(
        &mut self,
        ifname: &str,
        ifindex: u32,
        prog: &str,
        hook: TcAttachType,
    ) -> Result<(), DatapathError> {
        let attach_err = |source: io::Error| DatapathError::Attach {
            iface: ifname.to_owned(),
            prog: prog.to_owned(),
            source: Box::new(ProgramError::SyscallError(aya::sys::SyscallError {
                call: "bpf_prog_attach",
                io_error: source,
            })),
        };
        let ours = our_tcx_programs(ifname, hook)?;
        let classifier = classifier(&mut self.ebpf, prog)?;
        let program_err = program_error(prog);
        let info = classifier.info().map_err(program_err)?;
        let fd = classifier.fd().map_err(program_err)?;
        let mut rest = ours.iter();
        match rest.next() {
            Some((_, old)) if old.id() == info.id() => {}
            Some((_, old)) => {
                let old_fd = old.fd().map_err(program_err)?;
                sys::tcx_attach(ifindex, tcx_hook(hook), fd.as_fd(), Some(old_fd.as_fd()))
                    .map_err(attach_err)?;
            }
            None => {
                sys::tcx_attach(ifindex, tcx_hook(hook), fd.as_fd(), None).map_err(attach_err)?
            }
        }
        for (name, extra) in rest {
            let extra_fd = extra.fd().map_err(program_err)?;
            sys::tcx_detach(ifindex, tcx_hook(hook), extra_fd.as_fd())
                .map_err(|source| tcx_detach_err(ifname, name, source))?;
        }
        Ok(())
    }

    /// [`Datapath::attach`] by interface index: for links reported by rtnetlink, whose name
    /// may change (a CNI renaming its veth). Fails with [`DatapathError::Renamed`] if the
    /// interface changed its name between the lookup and the attach (the caller retries
    /// on the next link event). Returns the name it attached under.
    pub fn attach_index(&mut self, ifindex: u32) -> Result<String, DatapathError> {
        let name = sys::if_indextoname(ifindex).map_err(|source| DatapathError::Interface {
            iface: format!("#{ifindex}"),
            source,
        })?;
        let attached = self.attach(&name)?;
        if attached != ifindex {
            return Err(DatapathError::Renamed {
                iface: name,
                ifindex,
                now: attached,
            });
        }
        Ok(name)
    }

    /// [`Datapath::attach_index`] for a link that just appeared (the new-pod fast path): as
    /// quick as the kernel allows, and returns how it attached.
    ///
    /// Adding the first program to a tcx hook swaps the hook's program array and waits for
    /// an RCU grace period under the RTNL lock (`tcx_entry_sync`): measured here ~13 ms per
    /// hook, more under load. A cls_bpf filter takes ~0.1 ms. So in [`TcMode::Tcx`], unless
    /// ours are on both tcx hooks already (replaced in place, no grace period), this attaches
    /// cls_bpf filters and returns [`TcMode::Netlink`]: the caller moves the interface to tcx
    /// later with [`Datapath::attach_index`], which removes the filters once its programs are
    /// on. Until then both copies may run, with the same maps and so the same verdict.
    pub fn attach_index_quick(&mut self, ifindex: u32) -> Result<(String, TcMode), DatapathError> {
        let name = sys::if_indextoname(ifindex).map_err(|source| DatapathError::Interface {
            iface: format!("#{ifindex}"),
            source,
        })?;
        let mut mode = TcMode::Netlink;
        if self.tc_mode == TcMode::Tcx {
            let mut on_tcx = true;
            for &(_, hook) in &HOOKS {
                on_tcx &= !our_tcx_programs(&name, hook)?.is_empty();
            }
            if on_tcx {
                mode = TcMode::Tcx;
            }
        }
        let attached = self.attach_hooks_by(&name, &HOOKS, mode)?;
        if attached != ifindex {
            return Err(DatapathError::Renamed {
                iface: name,
                ifindex,
                now: attached,
            });
        }
        Ok((name, mode))
    }

    /// Removes our filters (found by program name, at any priority) from both TC hooks of
    /// `ifname`, in the calling thread's network namespace. Absent filters are not an error;
    /// the clsact qdisc is left in place (other tools may use it).
    pub fn detach(&mut self, ifname: &str) -> Result<(), DatapathError> {
        detach_hooks(ifname, &HOOKS)
    }

    /// Takes ownership of map `name` (a `MAP_*` constant), e.g. for the map programmer, who
    /// converts it with `aya::maps::HashMap::try_from` / `LpmTrie::try_from` etc. Each map
    /// can be taken once; the programs keep using it regardless.
    pub fn take_map(&mut self, name: &str) -> Result<aya::maps::Map, DatapathError> {
        self.ebpf
            .take_map(name)
            .ok_or_else(|| DatapathError::MapMissing {
                map: name.to_owned(),
            })
    }

    /// `max_entries` of every map of the object still held (call before maps are taken), as
    /// the kernel has it: an adopted pin keeps the size it was created with.
    pub fn map_capacities(&self) -> Result<Vec<(&'static str, u32)>, DatapathError> {
        use aya::maps::Map;
        let mut out = Vec::with_capacity(MAPS.len());
        for name in MAPS {
            let Some(map) = self.ebpf.map(name) else {
                continue;
            };
            let data = match map {
                Map::Array(d)
                | Map::PerCpuArray(d)
                | Map::HashMap(d)
                | Map::LruHashMap(d)
                | Map::LpmTrie(d) => d,
                _ => continue,
            };
            out.push((name, data.info().map_err(map_error(name))?.max_entries()));
        }
        Ok(out)
    }

    /// A second handle of map `name` (its file descriptor duplicated), which stays usable
    /// after the map itself is taken. For maps two owners write or read (METRICS: the
    /// programmer resets slots, the metrics read them).
    pub fn map_handle(&self, name: &str) -> Result<aya::maps::Map, DatapathError> {
        use aya::maps::Map;
        let map = self
            .ebpf
            .map(name)
            .ok_or_else(|| DatapathError::MapMissing {
                map: name.to_owned(),
            })?;
        let err = |source| DatapathError::Map {
            map: name.to_owned(),
            source: Box::new(source),
        };
        let dup = |data: &aya::maps::MapData| {
            let fd = data.fd().as_fd().try_clone_to_owned().map_err(|io_error| {
                err(aya::maps::MapError::SyscallError(aya::sys::SyscallError {
                    call: "dup",
                    io_error,
                }))
            })?;
            aya::maps::MapData::from_fd(fd).map_err(err)
        };
        Ok(match map {
            Map::PerCpuArray(d) => Map::PerCpuArray(dup(d)?),
            Map::HashMap(d) => Map::HashMap(dup(d)?),
            Map::LruHashMap(d) => Map::LruHashMap(dup(d)?),
            Map::LpmTrie(d) => Map::LpmTrie(dup(d)?),
            _ => {
                return Err(DatapathError::MapMissing {
                    map: format!("{name} (unexpected map type)"),
                });
            }
        })
    }

    /// Forgets every tracked connection, so the next packet of any flow is judged as a new
    /// connection. For the lab, where each probe round must see only new connections; an agent
    /// never does this. Returns how many entries were removed.
    pub fn flush_conntrack(&mut self) -> Result<usize, DatapathError> {
        let removed =
            self.flush_map::<CtKey>(MAP_CONNTRACK)? + self.flush_map::<CtKey4>(MAP_CONNTRACK4)?;
        self.invalidate_flow_cache()?;
        Ok(removed)
    }

    /// Removes every entry of the conntrack map `name` (keys `K`); returns how many.
    fn flush_map<K: aya::Pod>(&mut self, name: &str) -> Result<usize, DatapathError> {
        let map = self.ebpf.map_mut(name).ok_or_else(|| map_missing(name))?;
        let mut ct: aya::maps::HashMap<&mut aya::maps::MapData, K, CtValue> =
            aya::maps::HashMap::try_from(map).map_err(map_error(name))?;
        let keys: Vec<K> = ct
            .keys()
            .collect::<Result<_, _>>()
            .map_err(map_error(name))?;
        let mut removed = 0;
        for k in &keys {
            if ct.remove(k).is_ok() {
                removed += 1;
            }
        }
        Ok(removed)
    }

    /// Loads the benchmark's programs (`PROG_BENCH_NEW`, `PROG_BENCH_BUMP`) for
    /// [`Datapath::test_run`]; [`Datapath::load`] leaves them out (an agent never runs them,
    /// and `PROG_BENCH_NEW` is as large as `PROG_TO_POD`). Loading them again is a no-op.
    pub fn load_bench_programs(&mut self) -> Result<(), DatapathError> {
        for prog in [PROG_BENCH_NEW, PROG_BENCH_BUMP] {
            let program = classifier(&mut self.ebpf, prog)?;
            if program.fd().is_ok() {
                continue;
            }
            program.load().map_err(program_error(prog))?;
        }
        Ok(())
    }

    /// The kernel's run statistics of program `prog`: total run time and number of runs
    /// since it was loaded. Both stay 0 unless statistics are enabled (`BPF_ENABLE_STATS`,
    /// `aya::sys::enable_stats`, or the `kernel.bpf_stats_enabled` sysctl), which costs every
    /// program run two clock reads; for the benchmark.
    pub fn prog_stats(&self, prog: &str) -> Result<(std::time::Duration, u64), DatapathError> {
        let info = self
            .ebpf
            .program(prog)
            .ok_or_else(|| program_missing(prog))?
            .info()
            .map_err(program_error(prog))?;
        Ok((info.run_time(), info.run_count()))
    }

    /// Runs program `prog` (`PROG_FROM_POD`, `PROG_TO_POD` or the pass-only `PROG_PASS`) on
    /// `packet` (Ethernet frame) with `BPF_PROG_TEST_RUN`, `repeat` times (0 counts as 1), as
    /// if it crossed interface `ifindex`, which must exist in the calling thread's network
    /// namespace (use 1, `lo`).
    /// Maps are real: verdicts are counted and conntrack entries created.
    pub fn test_run(
        &self,
        prog: &str,
        packet: &[u8],
        ifindex: u32,
        repeat: u32,
    ) -> Result<TestRunResult, DatapathError> {
        self.run_test(prog, packet, ifindex, 0, repeat)
    }

    /// [`Datapath::test_run`] once, with `skb->mark` set to `mark` on entry; the result's
    /// `mark_out` is the mark the program left.
    pub fn test_run_mark(
        &self,
        prog: &str,
        packet: &[u8],
        ifindex: u32,
        mark: u32,
    ) -> Result<TestRunResult, DatapathError> {
        self.run_test(prog, packet, ifindex, mark, 1)
    }

    fn run_test(
        &self,
        prog: &str,
        packet: &[u8],
        ifindex: u32,
        mark: u32,
        repeat: u32,
    ) -> Result<TestRunResult, DatapathError> {
        let program = self
            .ebpf
            .program(prog)
            .ok_or_else(|| program_missing(prog))?;
        let fd = program.fd().map_err(program_error(prog))?;
        let raw =
            sys::prog_test_run(fd.as_fd(), packet, ifindex, mark, repeat).map_err(|source| {
                DatapathError::TestRun {
                    prog: prog.to_owned(),
                    source,
                }
            })?;
        Ok(TestRunResult {
            retval: raw.retval,
            duration_ns: raw.duration_ns,
            data_out: raw.data_out,
            mark_out: raw.mark_out,
        })
    }
}

/// The error of a map absent from the object (or already taken).
pub(super) fn map_missing(name: &str) -> DatapathError {
    DatapathError::MapMissing {
        map: name.to_owned(),
    }
}

/// The error of a program absent from the object.
fn program_missing(prog: &str) -> DatapathError {
    DatapathError::ProgramMissing {
        prog: prog.to_owned(),
    }
}

/// Wraps an error of an operation on program `prog`.
fn program_error(prog: &str) -> impl Fn(ProgramError) -> DatapathError + Copy + '_ {
    move |source| DatapathError::Program {
        prog: prog.to_owned(),
        source: Box::new(source),
    }
}

/// Wraps an error of an operation on map `name`.
pub(super) fn map_error(name: &str) -> impl Fn(aya::maps::MapError) -> DatapathError + '_ {
    move |source| DatapathError::Map {
        map: name.to_owned(),
        source: Box::new(source),
    }
}

/// HZ from a measured `jiffies` rate: the nearest of Linux's choices (100, 250, 300, 1000)
/// when within 10 % of it, else the rate itself (at least 1).
fn hz_of_rate(rate: f64) -> u64 {
    const CHOICES: [f64; 4] = [100.0, 250.0, 300.0, 1000.0];
    CHOICES
        .into_iter()
        .min_by(|a, b| (a - rate).abs().total_cmp(&(b - rate).abs()))
        .filter(|c| (c - rate).abs() <= 0.1 * c)
        .unwrap_or(rate.round().max(1.0)) as u64
}

/// Removes our filters of `hooks` (found by program name, at any priority) from `ifname`.
/// The names of the programs on tcx `hook` of `ifname` (in the calling thread's network
/// namespace), in the order they run; empty where the kernel has no tcx. The kernel keeps the
/// first 15 bytes of a name, which all of ours fit.
pub fn tcx_programs(ifname: &str, hook: TcAttachType) -> Result<Vec<String>, DatapathError> {
    Ok(tcx_query(ifname, hook)?
        .iter()
        .map(|p| p.name_as_str().unwrap_or("").to_owned())
        .collect())
}

pub(super) fn tcx_query(
    ifname: &str,
    hook: TcAttachType,
) -> Result<Vec<aya::programs::ProgramInfo>, DatapathError> {
    match SchedClassifier::query_tcx(ifname, hook) {
        Ok((_, programs)) => Ok(programs),
        Err(ProgramError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::EINVAL) => {
            Ok(Vec::new())
        }
        Err(source) => Err(DatapathError::Query {
            iface: ifname.to_owned(),
            source: Box::new(source),
        }),
    }
}

/// Ours ([`OUR_PROGS`]) among the programs on tcx `hook` of `ifname`, in run order.
fn our_tcx_programs(
    ifname: &str,
    hook: TcAttachType,
) -> Result<Vec<(String, aya::programs::ProgramInfo)>, DatapathError> {
    Ok(tcx_query(ifname, hook)?
        .into_iter()
        .filter_map(|p| {
            let name = p.name_as_str()?.to_owned();
            OUR_PROGS.contains(&name.as_str()).then_some((name, p))
        })
        .collect())
}

fn tcx_hook(hook: TcAttachType) -> sys::TcxHook {
    match hook {
        TcAttachType::Ingress => sys::TcxHook::Ingress,
        // Our programs run on the two clsact hooks only.
        _ => sys::TcxHook::Egress,
    }
}

fn tcx_detach_err(ifname: &str, prog: &str, source: io::Error) -> DatapathError {
    DatapathError::DetachTcx {
        iface: ifname.to_owned(),
        prog: prog.to_owned(),
        source,
    }
}

/// Removes the cls_bpf filter at our priority and handle on `hook` of `ifname`, if any
/// (there is none unless an agent attached in [`TcMode::Netlink`]).
pub(super) fn remove_our_filter(
    ifname: &str,
    prog: &str,
    hook: TcAttachType,
) -> Result<(), DatapathError> {
    let link =
        SchedClassifierLink::attached(ifname, hook, TC_PRIORITY, TcHandle::from(TC_HANDLE), None)
            .map_err(|source| DatapathError::Interface {
            iface: ifname.to_owned(),
            source,
        })?;
    match aya::programs::Link::detach(link) {
        Ok(()) => Ok(()),
        // No filter there (ENOENT), or no clsact qdisc at all (EINVAL).
        Err(ProgramError::NetlinkError(e) | ProgramError::TcError(TcError::NetlinkError(e)))
            if matches!(e.raw_os_error(), Some(libc::ENOENT | libc::EINVAL)) =>
        {
            Ok(())
        }
        Err(source) => Err(DatapathError::Attach {
            iface: ifname.to_owned(),
            prog: prog.to_owned(),
            source: Box::new(source),
        }),
    }
}

fn detach_hooks(ifname: &str, hooks: &[(&str, TcAttachType)]) -> Result<(), DatapathError> {
    let index = ifindex(ifname)?;
    for &(prog, hook) in hooks {
        for (name, p) in our_tcx_programs(ifname, hook)? {
            if name != prog {
                continue;
            }
            let fd = p.fd().map_err(program_error(prog))?;
            match sys::tcx_detach(index, tcx_hook(hook), fd.as_fd()) {
                Ok(()) => {}
                // Gone meanwhile (another agent, or the interface).
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
                Err(source) => return Err(tcx_detach_err(ifname, prog, source)),
            }
        }
        match tc::qdisc_detach_program(ifname, hook, prog) {
            Ok(()) => {}
            Err(TcError::IoError(e)) if e.kind() == io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(DatapathError::Detach {
                    iface: ifname.to_owned(),
                    prog: prog.to_owned(),
                    source: Box::new(source),
                });
            }
        }
    }
    Ok(())
}

fn classifier<'a>(
    ebpf: &'a mut Ebpf,
    prog: &str,
) -> Result<&'a mut SchedClassifier, DatapathError> {
    ebpf.program_mut(prog)
        .ok_or_else(|| program_missing(prog))?
        .try_into()
        .map_err(program_error(prog))
}

fn ifindex(ifname: &str) -> Result<u32, DatapathError> {
    let name = std::ffi::CString::new(ifname).map_err(|e| DatapathError::Interface {
        iface: ifname.to_owned(),
        source: io::Error::new(io::ErrorKind::InvalidInput, e),
    })?;
    sys::if_nametoindex(&name).map_err(|source| DatapathError::Interface {
        iface: ifname.to_owned(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_measured_jiffies_rate_rounds_to_the_hz_linux_offers() {
        assert_eq!(hz_of_rate(249.0), 250);
        assert_eq!(hz_of_rate(262.0), 250);
        assert_eq!(hz_of_rate(290.0), 300);
        assert_eq!(hz_of_rate(96.0), 100);
        assert_eq!(hz_of_rate(1030.0), 1000);
        // Far from every choice (an unusual architecture's HZ): the rate itself.
        assert_eq!(hz_of_rate(500.0), 500);
        assert_eq!(hz_of_rate(0.2), 1);
    }

    #[test]
    fn a_pin_directory_outside_bpffs_is_refused_with_the_fix() {
        let dir = std::env::temp_dir().join(format!("npm-not-bpffs-{}", std::process::id()));
        let err = Datapath::load(Some(&dir.join("v1"))).expect_err("tmp is not a bpffs");
        assert!(
            matches!(&err, DatapathError::NotBpffs { path } if *path == std::env::temp_dir()),
            "{err:?}"
        );
        assert!(err.to_string().contains("mount -t bpf"), "{err}");
        assert!(!dir.exists(), "nothing created outside bpffs");
    }
}
