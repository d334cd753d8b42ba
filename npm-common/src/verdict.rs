//! Directions and verdict reasons, as `u8` codes (no enums cross the ABI).

/// Traffic entering the pod (checked against the pod's ingress policy).
/// Seen on the host-side interface's TC *egress* hook.
pub const DIR_INGRESS: u8 = 0;
/// Traffic leaving the pod (checked against the pod's egress policy).
/// Seen on the host-side interface's TC *ingress* hook.
pub const DIR_EGRESS: u8 = 1;
/// Number of directions (array sizing).
pub const DIR_COUNT: u8 = 2;

// Verdict reasons. Values below `REASON_DROP_FIRST` pass the packet; the rest drop it.
/// Not IP (ARP, ...) or an interface npm does not manage: passed untouched.
pub const REASON_NOT_MANAGED: u8 = 0;
/// The endpoint is not isolated in this direction (no policy selects it for it).
pub const REASON_NOT_ISOLATED: u8 = 1;
/// A packet of a connection already allowed in this direction.
pub const REASON_ESTABLISHED: u8 = 2;
/// A reply packet of a connection allowed in the other direction.
pub const REASON_REPLY: u8 = 3;
/// A new connection allowed by a policy entry.
pub const REASON_POLICY_ALLOW: u8 = 4;
/// Traffic from or to the pod's own node (always allowed, as Kubernetes requires).
pub const REASON_HOST: u8 = 5;
/// Traffic from the pod to itself (a pod cannot block itself).
pub const REASON_SELF: u8 = 6;
/// Egress to a Service range that the pre-DNAT lookup denied: passed with `MARK_DEFERRED`
/// for the post-DNAT check, which counts the packet again under its final reason.
pub const REASON_DEFERRED: u8 = 7;
/// First reason code that drops the packet.
pub const REASON_DROP_FIRST: u8 = 128;
/// No policy entry allows this new connection in an isolated direction.
pub const REASON_DROP_POLICY: u8 = 128;
/// An IP packet too short or malformed to classify in an isolated direction.
pub const REASON_DROP_MALFORMED: u8 = 129;
/// A deferred packet whose source is not a local pod with an endpoint (kube-proxy
/// masqueraded it, or the pod went away): dropped, counted under the unmanaged slot, egress.
pub const REASON_DROP_UNKNOWN_SOURCE: u8 = 130;
/// A new flow (or an ARP / neighbour-discovery claim) whose pod-side address is not the
/// pod's: leaving a pod, a source address IDENTITIES gives to another interface or to the
/// node (or, from a placed pod, one it does not know); entering a pod, a destination
/// address of another interface or of the node. Counted under the endpoint's slot.
pub const REASON_DROP_SPOOFED: u8 = 131;

/// True when `reason` passes the packet.
#[inline(always)]
pub const fn is_allow(reason: u8) -> bool {
    reason < REASON_DROP_FIRST
}
