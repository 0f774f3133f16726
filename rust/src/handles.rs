//! Typed addresses, in the manner of cudarc: a communicator, a window, device memory and a
//! stream are all "just an address" to NCCL, and mixing them up is the classic FFI bug. Each gets
//! its own type, so the compiler keeps them apart; only `nccl::api` turns them back into the raw
//! pointers `nccl.h` declares.

use std::fmt;

macro_rules! address {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
        pub struct $name(usize);

        impl $name {
            pub const fn new(address: usize) -> Self {
                Self(address)
            }

            pub const fn addr(self) -> usize {
                self.0
            }

            pub const fn is_null(self) -> bool {
                self.0 == 0
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!(stringify!($name), "({:#x})"), self.0)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{:#x}", self.0)
            }
        }
    };
}

address!(
    /// An `ncclComm_t`: owned by whoever created it (torch, an engine, or `comm::Communicator`).
    CommPtr
);
address!(
    /// An `ncclWindow_t` that `ncclCommWindowRegister` handed back.
    WindowHandle
);
address!(
    /// An address in device memory (a pool segment, or a tensor inside one).
    DevicePtr
);
address!(
    /// A `cudaStream_t`; 0 is the legacy default stream.
    StreamPtr
);

impl DevicePtr {
    /// `self + offset`, or `None` past the end of the address space.
    pub fn checked_add(self, offset: usize) -> Option<Self> {
        self.0.checked_add(offset).map(Self)
    }
}
