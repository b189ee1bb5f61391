//! Task-local storage maps (`BPF_MAP_TYPE_TASK_STORAGE`, kernel 5.11+), which aya-ebpf
//! 0.2 does not wrap: a value hangs off each `task_struct`, found without hashing and freed
//! by the kernel when the task exits.

use core::{ffi::c_void, ptr};

use aya_ebpf::{
    bindings::{BPF_F_NO_PREALLOC, BPF_LOCAL_STORAGE_GET_F_CREATE, bpf_map_type, task_struct},
    helpers::generated::bpf_task_storage_get,
};

/// A BTF map definition (section `.maps`): the fields only carry types for the loader.
#[repr(C)]
pub struct TaskStorage<T> {
    r#type: *const [i32; bpf_map_type::BPF_MAP_TYPE_TASK_STORAGE as usize],
    key: *const i32,
    value: *const T,
    max_entries: *const [i32; 0],
    map_flags: *const [i32; BPF_F_NO_PREALLOC as usize],
}

// SAFETY: the fields are never dereferenced; the kernel owns the storage.
unsafe impl<T> Sync for TaskStorage<T> {}

impl<T> TaskStorage<T> {
    pub const fn new() -> Self {
        Self {
            r#type: ptr::null(),
            key: ptr::null(),
            value: ptr::null(),
            max_entries: ptr::null(),
            map_flags: ptr::null(),
        }
    }

    #[inline(always)]
    fn get(&self, task: *mut task_struct, flags: u64) -> Option<*mut T> {
        let map = ptr::from_ref(self).cast_mut().cast::<c_void>();
        // SAFETY: `task` is a BTF task pointer handed to us by the kernel.
        let value = unsafe { bpf_task_storage_get(map, task, ptr::null_mut(), flags) };
        (!value.is_null()).then_some(value.cast::<T>())
    }

    /// The task's value, if it has one.
    #[inline(always)]
    pub fn lookup(&self, task: *mut task_struct) -> Option<*mut T> {
        self.get(task, 0)
    }

    /// The task's value, created zeroed if it has none; `None` when allocation failed.
    #[inline(always)]
    pub fn get_or_create(&self, task: *mut task_struct) -> Option<*mut T> {
        self.get(task, u64::from(BPF_LOCAL_STORAGE_GET_F_CREATE))
    }
}
