//! muster-client against real agents on port 0.

mod cache;
mod support;
mod view;
