//! muster-client against real agents on port 0.

mod support;
mod view;
