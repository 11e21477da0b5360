//! muster-client against real agents on port 0.

mod balance;
mod cache;
mod register;
mod support;
mod tower;
mod view;
