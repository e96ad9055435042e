//! The DR appliance: lands the journal shipped by agents, applies it to replica disks and
//! keeps point-in-time history. Not built yet; see the open issues.
