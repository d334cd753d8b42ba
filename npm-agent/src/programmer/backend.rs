//! Where plans are applied: the kernel maps through aya, or [`super::fake::FakeBackend`].
use aya::maps::lpm_trie::{Key, LpmTrie};
use aya::maps::{HashMap, Map, MapData, MapError, PerCpuArray, PerCpuValues};
use npm_common::maps::{
    Addr16, EndpointInfo, MAP_CIDRS, MAP_ENDPOINTS, MAP_IDENTITIES, MAP_METRICS, MAP_PAIRS,
    MAP_POLICY, MAP_SERVICES, PairKey, PairValue, PeerInfo, PolicyKey, PolicyValue,
};
use npm_common::metrics::{COUNTER_STRIDE, MetricsValue, SLOT_RETIRED};

use super::plan::Op;
use crate::compiler::DesiredMaps;

#[derive(Debug, thiserror::Error)]
pub enum ProgrammerError {
    #[error("map {map}: cannot open it as the expected type")]
    Open {
        map: &'static str,
        #[source]
        source: MapError,
    },
    #[error("map {map}: cannot read its entries")]
    Dump {
        map: &'static str,
        #[source]
        source: MapError,
    },
    #[error("map {map}: {op} failed")]
    Update {
        map: &'static str,
        op: &'static str,
        #[source]
        source: MapError,
    },
}

impl ProgrammerError {
    /// Short label for metrics.
    pub fn metric_label(&self) -> &'static str {
        match self {
            ProgrammerError::Open { .. } => "open",
            ProgrammerError::Dump { .. } => "dump",
            ProgrammerError::Update { .. } => "update",
        }
    }
}

/// Reads and writes the policy maps and the Service ranges (and resets counter slots in
/// METRICS).
pub trait MapBackend {
    /// The maps' present contents.
    fn dump(&self) -> Result<DesiredMaps, ProgrammerError>;
    /// Applies one operation.
    fn apply(&mut self, op: &Op) -> Result<(), ProgrammerError>;
}

/// The kernel maps, through aya.
pub struct AyaBackend {
    endpoints: HashMap<MapData, u32, EndpointInfo>,
    identities: HashMap<MapData, Addr16, PeerInfo>,
    cidrs: LpmTrie<MapData, Addr16, u32>,
    policy: LpmTrie<MapData, PolicyKey, PolicyValue>,
    pairs: HashMap<MapData, PairKey, PairValue>,
    services: LpmTrie<MapData, Addr16, u32>,
    metrics: PerCpuArray<MapData, MetricsValue>,
}

impl AyaBackend {
    /// Wraps the maps taken from the loaded datapath (`metrics` may be a second handle of
    /// the METRICS map, see `Datapath::map_handle`).
    pub fn new(
        endpoints: Map,
        identities: Map,
        cidrs: Map,
        policy: Map,
        pairs: Map,
        services: Map,
        metrics: Map,
    ) -> Result<Self, ProgrammerError> {
        Ok(Self {
            metrics: PerCpuArray::try_from(metrics).map_err(|source| ProgrammerError::Open {
                map: MAP_METRICS,
                source,
            })?,
            endpoints: HashMap::try_from(endpoints).map_err(|source| ProgrammerError::Open {
                map: MAP_ENDPOINTS,
                source,
            })?,
            identities: HashMap::try_from(identities).map_err(|source| ProgrammerError::Open {
                map: MAP_IDENTITIES,
                source,
            })?,
            cidrs: LpmTrie::try_from(cidrs).map_err(|source| ProgrammerError::Open {
                map: MAP_CIDRS,
                source,
            })?,
            policy: LpmTrie::try_from(policy).map_err(|source| ProgrammerError::Open {
                map: MAP_POLICY,
                source,
            })?,
            pairs: HashMap::try_from(pairs).map_err(|source| ProgrammerError::Open {
                map: MAP_PAIRS,
                source,
            })?,
            services: LpmTrie::try_from(services).map_err(|source| ProgrammerError::Open {
                map: MAP_SERVICES,
                source,
            })?,
        })
    }
}

fn dump_err(map: &'static str) -> impl Fn(MapError) -> ProgrammerError {
    move |source| ProgrammerError::Dump { map, source }
}

fn update_err(map: &'static str, op: &'static str) -> impl Fn(MapError) -> ProgrammerError {
    move |source| ProgrammerError::Update { map, op, source }
}

impl MapBackend for AyaBackend {
    fn dump(&self) -> Result<DesiredMaps, ProgrammerError> {
        let mut out = DesiredMaps::default();
        for item in self.endpoints.iter() {
            let (k, v) = item.map_err(dump_err(MAP_ENDPOINTS))?;
            out.endpoints.insert(k, v);
        }
        for item in self.identities.iter() {
            let (k, v) = item.map_err(dump_err(MAP_IDENTITIES))?;
            out.identities.insert(k, v);
        }
        for item in self.cidrs.iter() {
            let (k, v) = item.map_err(dump_err(MAP_CIDRS))?;
            out.cidrs.insert((k.prefix_len(), k.data()), v);
        }
        for item in self.policy.iter() {
            let (k, v) = item.map_err(dump_err(MAP_POLICY))?;
            out.policy.insert((k.prefix_len(), k.data()), v);
        }
        for item in self.pairs.iter() {
            let (k, v) = item.map_err(dump_err(MAP_PAIRS))?;
            out.pairs.insert(k, v);
        }
        for item in self.services.iter() {
            let (k, v) = item.map_err(dump_err(MAP_SERVICES))?;
            out.services.insert((k.prefix_len(), k.data()), v);
        }
        Ok(out)
    }

    fn apply(&mut self, op: &Op) -> Result<(), ProgrammerError> {
        match op {
            Op::UpsertPolicy((len, k), v) => self
                .policy
                .insert(&Key::new(*len, *k), *v, 0)
                .map_err(update_err(MAP_POLICY, "insert")),
            Op::UpsertPair(k, v) => self
                .pairs
                .insert(*k, *v, 0)
                .map_err(update_err(MAP_PAIRS, "insert")),
            Op::DeletePair(k) => {
                ignore_missing(self.pairs.remove(k)).map_err(update_err(MAP_PAIRS, "remove"))
            }
            Op::UpsertCidr((len, k), v) => self
                .cidrs
                .insert(&Key::new(*len, *k), *v, 0)
                .map_err(update_err(MAP_CIDRS, "insert")),
            Op::UpsertIdentity(k, v) => self
                .identities
                .insert(*k, *v, 0)
                .map_err(update_err(MAP_IDENTITIES, "insert")),
            Op::UpsertEndpoint(k, v) => self
                .endpoints
                .insert(*k, *v, 0)
                .map_err(update_err(MAP_ENDPOINTS, "insert")),
            Op::DeleteEndpoint(k) => ignore_missing(self.endpoints.remove(k))
                .map_err(update_err(MAP_ENDPOINTS, "remove")),
            Op::DeleteIdentity(k) => ignore_missing(self.identities.remove(k))
                .map_err(update_err(MAP_IDENTITIES, "remove")),
            Op::DeleteCidr((len, k)) => ignore_missing(self.cidrs.remove(&Key::new(*len, *k)))
                .map_err(update_err(MAP_CIDRS, "remove")),
            Op::DeletePolicy((len, k)) => ignore_missing(self.policy.remove(&Key::new(*len, *k)))
                .map_err(update_err(MAP_POLICY, "remove")),
            Op::UpsertService((len, k), v) => self
                .services
                .insert(&Key::new(*len, *k), *v, 0)
                .map_err(update_err(MAP_SERVICES, "insert")),
            Op::DeleteService((len, k)) => {
                ignore_missing(self.services.remove(&Key::new(*len, *k)))
                    .map_err(update_err(MAP_SERVICES, "remove"))
            }
            Op::ResetCounters(slot) => self
                .reset_counters(*slot)
                .map_err(update_err(MAP_METRICS, "reset")),
        }
    }
}

impl AyaBackend {
    /// Adds every counter of `slot` to the retired slot and zeroes it, CPU by CPU. The
    /// datapath never writes the retired slot, so the read-add-write there races nothing; a
    /// packet counted in `slot` between its read and its zeroing is lost (only stale
    /// conntrack entries of a gone interface can count there).
    fn reset_counters(&mut self, slot: u32) -> Result<(), MapError> {
        for i in 0..COUNTER_STRIDE {
            let at = slot * COUNTER_STRIDE + i;
            let counts = self.metrics.get(&at, 0)?;
            if counts.iter().all(|v| v.packets == 0 && v.bytes == 0) {
                continue;
            }
            let retired_at = SLOT_RETIRED * COUNTER_STRIDE + i;
            let retired = self.metrics.get(&retired_at, 0)?;
            let sum: Vec<MetricsValue> = retired
                .iter()
                .zip(counts.iter())
                .map(|(r, c)| MetricsValue {
                    packets: r.packets.wrapping_add(c.packets),
                    bytes: r.bytes.wrapping_add(c.bytes),
                })
                .collect();
            let zero = vec![MetricsValue::default(); sum.len()];
            self.metrics.set(retired_at, per_cpu(sum)?, 0)?;
            self.metrics.set(at, per_cpu(zero)?, 0)?;
        }
        Ok(())
    }
}

fn per_cpu(v: Vec<MetricsValue>) -> Result<PerCpuValues<MetricsValue>, MapError> {
    PerCpuValues::try_from(v).map_err(|io_error| {
        MapError::SyscallError(aya::sys::SyscallError {
            call: "per-CPU values",
            io_error,
        })
    })
}

/// Removing an entry that is already gone is success: the map holds what we want.
fn ignore_missing(r: Result<(), MapError>) -> Result<(), MapError> {
    match r {
        Err(MapError::KeyNotFound) => Ok(()),
        Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        other => other,
    }
}
