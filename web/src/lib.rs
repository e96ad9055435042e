//! The control plane: REST API, web UI and the `cdp` client. The only crate that speaks HTTP
//! and JSON. Not built yet; see the open issues.
