//! muster-client against real agents on port 0.

mod balance;
mod cache;
mod catalog;
mod register;
mod support;
mod tls;
mod token;
mod tower;
mod view;
