//! meshaccel's benchmark programs (`hop`, `mesh`, `wrk`, `sweep`, `report`; `control` measures the
//! controller). Each runs baseline and accelerated **interleaved in one run** in the local mesh of
//! `meshaccel-e2e`, repeats, and prints ratios accelerated/baseline with their spread; results go
//! to JSON and PNG files.
//!
//! How a run interleaves: the e2e tool's A/B clients (`meshaccel_e2e::tool::ab`) open their
//! baseline connections while the agent's switch is off (those sockets never enter the sockhash:
//! plain TCP for life), then, with the switch on, their accelerated connections, and alternate
//! blocks A B B A … on both for the rest of the run. Both sides share processes, CPUs, caches and
//! whatever else the machine is doing at that moment; the two halves of each side (every other
//! block) give the run's own noise.

pub mod driver;
pub mod plot;
pub mod report_tail;
pub mod stats;
pub mod targets;
pub mod wrk;
