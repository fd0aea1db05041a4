//! The class-state writer: the beat engine's handle on the kernel's per-class admission state
//! and budgets, through shared mappings of `KNHK_CLASS_STATE` and `KNHK_BUDGETS`.

use super::*;

/// Writes SLO admission control into the kernel: class states (`knhk_abi::STATE_*`) and
/// per-beat budgets, each one aligned store through a shared mapping, read by every connect.
/// Cheap to clone; needs no lock.
#[derive(Debug, Clone)]
pub struct ClassStateWriter(
    pub(super) std::sync::Arc<sys::MmapArray>,
    pub(super) std::sync::Arc<sys::MmapArray>,
);

/// The kernel lays out mmapable array elements at a stride of the value size rounded up to 8.
const MMAP_ELEM_STRIDE: usize = 8;
/// Stride of `ClassControl` elements in the class-state mapping.
pub(super) const CONTROL_STRIDE: usize = size_of::<ClassControl>().div_ceil(8) * 8;

impl ClassStateWriter {
    /// The `ClassControl` element of `class` in the shared mapping. Fields are reached through
    /// it (no hand-computed offsets).
    fn control(&self, class: Class) -> *mut ClassControl {
        self.0.at::<ClassControl>(class.index() * CONTROL_STRIDE)
    }

    /// The budget element of `class`.
    fn budget_cell(&self, class: Class) -> &std::sync::atomic::AtomicI64 {
        let p = self.1.at::<i64>(class.index() * MMAP_ELEM_STRIDE);
        // SAFETY: aligned i64 inside the mapping, alive as long as `self`; the kernel updates it
        // atomically too.
        unsafe { std::sync::atomic::AtomicI64::from_ptr(p) }
    }

    /// Sets the state of `class`.
    pub fn set(&self, class: Class, state: ClassState) {
        // SAFETY: aligned u32 field inside the mapping; the kernel reads it with a plain load.
        unsafe {
            AtomicU32::from_ptr(&raw mut (*self.control(class)).state)
                .store(abi::class_state(state), Ordering::SeqCst)
        };
    }

    /// Sets the state applied to `class`'s connects once its budget is spent.
    pub fn set_over_budget(&self, class: Class, state: ClassState) {
        // SAFETY: as in `set`.
        unsafe {
            AtomicU32::from_ptr(&raw mut (*self.control(class)).over_budget)
                .store(abi::class_state(state), Ordering::SeqCst)
        };
    }

    /// Sets `class`'s admission budget for the coming beat (`None`: unlimited).
    pub fn set_budget(&self, class: Class, budget: Option<u64>) {
        let v = budget.map_or(BUDGET_UNLIMITED, |b| b.min(i64::MAX as u64 - 1) as i64);
        self.budget_cell(class).store(v, Ordering::SeqCst);
    }

    /// What is left of `class`'s budget this beat (`None`: unlimited; negative: overspent).
    pub fn budget(&self, class: Class) -> Option<i64> {
        let v = self.budget_cell(class).load(Ordering::SeqCst);
        (v != BUDGET_UNLIMITED).then_some(v)
    }

    /// Marks the decisions as fresh now; the kernel ignores states and budgets once no heartbeat
    /// came for `stale_after` (`None`: never; SLO admission then never fails open).
    pub fn heartbeat(&self, stale_after: Option<Duration>) {
        let now = sys::monotonic_ns();
        let stale = stale_after.map_or(0, |d| d.as_nanos().min(u64::MAX as u128) as u64);
        for class in CLASSES_IN_ABI_ORDER {
            let c = self.control(class);
            // SAFETY: aligned u64 fields of the class's `ClassControl` inside the mapping.
            unsafe {
                std::sync::atomic::AtomicU64::from_ptr(&raw mut (*c).heartbeat_ns)
                    .store(now, Ordering::SeqCst);
                std::sync::atomic::AtomicU64::from_ptr(&raw mut (*c).stale_after_ns)
                    .store(stale, Ordering::SeqCst);
            }
        }
    }

    /// The state of `class`.
    pub fn get(&self, class: Class) -> u32 {
        // SAFETY: as in `set`.
        unsafe { AtomicU32::from_ptr(&raw mut (*self.control(class)).state).load(Ordering::SeqCst) }
    }
}
