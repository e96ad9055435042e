//! The NBD protocol as pure codecs over bytes, shared by the agent's capture server and the
//! appliance's recovery views. It performs no I/O and never panics on any input.
