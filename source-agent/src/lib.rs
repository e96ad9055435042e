//! The source agent: an NBD server in the VM's I/O path that journals every write.
