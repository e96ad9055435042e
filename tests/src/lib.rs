//! Harness for the end-to-end tests: finds the built binaries, starts them on loopback and
//! drives them with real NBD clients. Tests live in `tests/tests/`.
