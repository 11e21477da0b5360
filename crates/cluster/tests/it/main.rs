//! The test harness itself: real etcd members and the fault-injecting proxy.

mod etcd;
mod proxy;
