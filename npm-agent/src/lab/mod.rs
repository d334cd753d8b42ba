//! The lab: a throw-away node in network namespaces (to be written)
