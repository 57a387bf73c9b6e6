//! Durability helpers: re-exported from `ferry-durable`, the one implementation every writer uses.

pub use ferry_durable::{
    adopt_owner, create_dir_durable, durable_rename, durable_write, fsync_dir, sync_data, sync_file,
};
