//! The dashboard's data and page, apart from HTTP: what each instance writes of
//! itself to Redis every second (`snapshot.rs`, with per-function counts from
//! `functions.rs`), how the cluster's state is put
//! together from what Redis holds (`state.rs`, pure), and the server-rendered
//! HTML page with its script and stylesheet (`page.rs`, `app.js`, `style.css`).
//! The routes that serve them and the Redis reads behind `/dashboard/state.json`
//! are in `http/dashboard.rs`. The actions an admin takes from the page
//! (`actions.rs`), and the recent error replies each instance keeps and writes
//! (`errors.rs`). Not for: serving HTTP.

pub(crate) mod actions;
pub(crate) mod errors;
pub(crate) mod functions;
pub(crate) mod page;
pub(crate) mod snapshot;
pub(crate) mod state;
