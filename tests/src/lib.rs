//! Test support: topology builder, etcd runner.
