//! Placeholder: see the issues for what lands here.
